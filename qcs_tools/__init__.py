"""Developer tools for qcs-ext: benchmarks, sanitizer and fault-injection harnesses, the CUDA
compile gate and the variant comparison. Not part of the installed package (the wheel ships
``qcs_ext`` and ``qcs`` only); run from a checkout as ``python -m qcs_tools.NAME``:

- ``compare``: the CSA speed table (fused op against its baselines, one run);
- ``ops_cases``: the shapes and implementations ``compare`` and ``benchmarks/`` time;
- ``bench_sampler``, ``bench_train_step``: the tuple sampler and one training step;
- ``sanitize`` (+ ``sanitize_pytest_plugin``): the op tests against ASan+UBSan / TSan builds;
- ``fault_injection``: training killed at random moments must resume bit-identical;
- ``cuda_compile_gate``: nvcc for sm_80/sm_90, no register spills or local memory;
- ``compare_variants``: QCS/DCS/baseline/DAN/PCD trained side by side into one table.
"""
