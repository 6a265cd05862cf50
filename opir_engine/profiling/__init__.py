"""Profiling: latency, throughput, FLOPs, memory and where the time goes (`opir profile`).

The parts, each imported from its own module:
`settings` (what a profile is asked for, size parsing, ProfileError), `profile` (run_profile,
profile_models, the models and their parts), `timing` (interleaved timing, peak memory),
`report` (the figures, written as JSON), `machine` (describe_machine) and `promptir` (the
PromptIR baseline). The analytic OPIR FLOP count is the model's own: opir_engine.model.flops.
Rendering the report as tables belongs to the command line (opir_engine.cli.render_profile).
"""
