"""The jobs of ``benchmarks/gpu.py`` (the command), one module each: :mod:`.plan` (what is measured, in which order,
the output format), :mod:`.pipelines` (random-weight SD 1.5 / SDXL pipelines), :mod:`.runner` (state shared by the
measurements, peak memory, failure classes), :mod:`.training` (step time and peak memory of ``Editor.fit``),
:mod:`.sampling` (time per image, unedited and with 1 / 10 artifacts), :mod:`.cuda_tests` (the ``-m cuda`` pytest
run) and :mod:`.report` (ratios, tables, ``gpu.md``, the docs section).

Imported with ``benchmarks/`` on ``sys.path`` (as ``benchmarks/gpu.py`` and ``benchmarks/run_all.py`` do), like the
``perf_*`` modules it uses.
"""
