"""The shipped digits demo: its dataset, classifier and FD-digits (``digits``); the teacher and
classifier weights live in ``accel/assets``."""
