"""Checkpoints as users name them: a local pipeline folder, or a Hugging Face Hub id
(``stabilityai/stable-diffusion-xl-base-1.0``) resolved through ``huggingface_hub`` (its cache,
``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, a ``revision``), fetching only configs,
tokenizer files and safetensors, never pickles; and a weights ``variant`` (``fp16``: the
``*.fp16.safetensors`` files diffusers' ``save_pretrained(variant=...)`` writes) presented to the
loaders as a plain pipeline folder (``variant_view``).

The env variables are read when a name is resolved, not when ``huggingface_hub`` is imported, so
a test (or a user's shell) that sets them later is obeyed."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from accel.core.errors import CheckpointError

HUB_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.txt",  # CLIP's merges.txt
    "*.model",  # sentencepiece (T5, Gemma)
)
"""The files fetched from the Hub: configs, tokenizers and safetensors weights; never ``.bin``,
``.ckpt``, ``.pt`` or ``.pkl`` (accel never unpickles)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(name: str | Path) -> bool:
    """``name`` reads as a Hub repository id (``owner/name``) and is no local path."""
    text = str(name)
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists()


def hub_cache() -> Path:
    """The Hub cache huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path("~/.cache/huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def resolve_model(
    name: str | Path, revision: str | None = None, variant: str | None = None
) -> Path:
    """The local pipeline folder ``name`` names: ``name`` itself when it is a path, else the
    snapshot of Hub id ``name`` at ``revision`` (default ``main``) in the Hub cache, downloaded
    (configs, tokenizers and safetensors only) unless ``HF_HUB_OFFLINE`` is set. With a
    ``variant``, the folder the loaders read is ``variant_view``'s. Clear errors for an id that
    is neither cached nor reachable, and for a revision given with a local folder."""
    path = Path(name).expanduser()
    if not is_hub_id(name):
        if revision is not None:
            raise CheckpointError(
                f"--revision {revision} applies to Hub ids; {path} is a local folder"
            )
        return variant_view(path, variant) if variant and path.is_dir() else path
    root = _snapshot(str(name), revision, variant)
    return variant_view(root, variant) if variant else root


def _snapshot(repo: str, revision: str | None, variant: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(
            f"{repo!r} is a Hub id, and huggingface_hub is not installed: pip install "
            "huggingface_hub, or give a local pipeline folder"
        ) from None
    patterns = list(HUB_PATTERNS)
    if variant:  # the variant's weights and the configs; not the full-precision files beside
        patterns = [p for p in patterns if p != "*.safetensors"] + [f"*.{variant}.safetensors"]
    at = f"{repo}@{revision or 'main'}"
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            cache_dir=str(hub_cache()),
            allow_patterns=patterns,
            local_files_only=offline(),
        )
    except LocalEntryNotFoundError:
        how = (
            "HF_HUB_OFFLINE is set: download it once with the network on, or unset it"
            if offline()
            else "the Hub is unreachable from here: download it where it is reachable and copy "
            f"the cache ({hub_cache()}), or give a local pipeline folder"
        )
        raise CheckpointError(
            f"{at} is not in the Hub cache {hub_cache()} (and no local folder is named {repo}); "
            f"{how}"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo} has no revision {revision!r} on the Hub") from None
    except GatedRepoError:
        raise CheckpointError(
            f"{repo} is gated: accept its licence on the Hub and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo} is not a Hub repository (or it is private: log in with hf auth login), "
            "and no local folder has that name"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{at} could not be fetched: {msg}") from None
    root = Path(folder)
    if variant:  # a component without the variant loads its own weights, as diffusers does
        bare = [
            c.parent.name
            for c in root.glob("*/config.json")
            if not any(c.parent.glob("*.safetensors"))
        ]
        if bare:
            return _snapshot_more(snapshot_download, repo, revision, bare) or root
    return root


def _snapshot_more(download, repo: str, revision: str | None, folders: list[str]) -> Path | None:
    try:
        return Path(
            download(
                repo,
                revision=revision,
                cache_dir=str(hub_cache()),
                allow_patterns=[f"{f}/*.safetensors" for f in folders],
                local_files_only=offline(),
            )
        )
    except Exception:  # the variant view then says which weights are missing
        return None


def variant_view(root: Path, variant: str) -> Path:
    """``root``'s pipeline with its ``variant`` weights under the plain names the loaders read
    (``unet/diffusion_pytorch_model.fp16.safetensors`` as ``unet/diffusion_pytorch_model
    .safetensors``; a component without that variant keeps its own file), every other file as it
    is: a folder of hard links (copies where links are impossible) under ``~/.cache/accel`` (or
    ``ACCEL_CACHE``), keyed by the files' names, sizes and times, written whole or not at all. The
    weights keep their dtype on disk (the loader reads them into the model's)."""
    root = Path(root)
    suffix = f".{variant}.safetensors"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    chosen: dict[Path, Path] = {}
    for file in files:
        rel = file.relative_to(root)
        if file.name.endswith(suffix):
            chosen[rel.with_name(file.name[: -len(suffix)] + ".safetensors")] = file
        elif rel not in chosen:
            chosen[rel] = file
    if not any(f.name.endswith(suffix) for f in files):
        found = sorted({f.name for f in files if f.suffix == ".safetensors"}) or ["none"]
        raise CheckpointError(
            f"{root} has no {variant!r} variant weights (no *{suffix} files; its safetensors: "
            f"{', '.join(found[:4])}); drop --variant, or give the variant its files carry"
        )
    digest = hashlib.sha256(str(root.resolve()).encode())
    for rel, file in sorted(chosen.items()):
        st = file.stat()
        digest.update(f"{rel}\0{file.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = Path(os.environ.get("ACCEL_CACHE") or "~/.cache/accel").expanduser()
    view = cache / "variants" / f"{digest.hexdigest()[:24]}-{variant}"
    if view.is_dir():
        return view
    tmp = view.with_name(f"{view.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, file in chosen.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            source = file.resolve()  # the Hub cache's snapshot entries link to its blobs
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        try:
            tmp.rename(view)
        except OSError:  # another process made it first
            if not view.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return view
