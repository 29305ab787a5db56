"""Reproducible studies of keras_mwbp (issue 12): `python -m experiments.run STUDY`.

Not part of the installed package and not collected by pytest (`testpaths =
tests`); run from the repository root.
"""
