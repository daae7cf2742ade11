"""The processes of a multi-process run (``accelerate launch`` / ``torchrun``); accelerate is
imported only when there are several."""

from __future__ import annotations

import os

from accel.core.errors import AccelError


class Processes:
    """The processes of one ``accelerate launch`` (or ``torchrun``) run; a plain run is one.

    Every process runs the recipe. Training stages (``Stage.data_parallel``) run on all of them;
    other stages run on process 0 while the rest wait; only process 0 writes to the store, and it
    tells the others whether the stage succeeded, so every process stops with the same error."""

    def __init__(self) -> None:
        self.count, self.rank = 1, 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # the flag `accelerate launch --cpu` sets, read as Accelerator() reads it
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            if state.num_processes == 1:
                raise AccelError(
                    f"launched as {os.environ['WORLD_SIZE']} processes, but Accelerate found no "
                    "distributed backend; on a machine without GPUs set ACCELERATE_USE_CPU=true "
                    "(gloo), or run one process"
                )
            self.count, self.rank = state.num_processes, state.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def agree(self, error: str | None) -> str | None:
        """Process 0's error message (None: success), on every process."""
        if self.count == 1:
            return error
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([error], from_process=0)[0]
