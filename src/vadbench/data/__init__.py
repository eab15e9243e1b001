"""Datasets: the embedded synthetic SEM generator, real-dataset preparation and the common loader."""
