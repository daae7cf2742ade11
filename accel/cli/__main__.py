from accel.cli import console

console()
