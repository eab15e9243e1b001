"""FractalDB-style synthetic classification data from random Iterated Function Systems."""
