"""On-disk contracts of a pipeline run (docs/architecture.md, "Run directory"), by seam; every file is readable
with plain ``pyarrow.parquet`` or ``json``, nothing is pickled:

* :mod:`transfgu.store.atomic`: atomic writes (temporary name, fsync, ``os.replace``), file modes, strict
  JSON (no pyarrow, no numpy: light enough for the command line);
* :mod:`transfgu.store.formats`: the Parquet tables (crop features, label bank), their schemas and writer
  options;
* :mod:`transfgu.store.manifest`: the run manifest ``_manifest.json`` and the config hash.
"""
