"""Hugging Face modeling code for exported skiptron models. The two modules import nothing from skiptron:
`skiptron-convert to-hf` copies them into the export directory (see tools/convert.py)."""
