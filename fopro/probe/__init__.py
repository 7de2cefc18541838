"""`fopro probe`, one concept per module (import from the module, this package imports nothing):

- :mod:`fopro.probe.frequency`: the teacher's frequency preferences (``run_probe``) and its linear probe;
- :mod:`fopro.probe.options`: ``ProbeOptions`` and their checks; :mod:`fopro.probe.verdict`: the preference and its line;
- :mod:`fopro.probe.fpg_report`: what a learned FPG does (``probe_fpg``);
- :mod:`fopro.probe.file`: the probe.json contract (torch-free), ``band_gains_from_probe`` for ``--probe-init``;
- :mod:`fopro.probe.crossval`: cross-validated NCM / k-NN on frozen embeddings (numpy only).
"""
