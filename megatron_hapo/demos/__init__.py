"""Runnable demos on a CPU: the quickstart's two stages, both through the trainer's own step
(:func:`megatron_hapo.trainer.loop.train`).

- :mod:`megatron_hapo.demos.presets`: every algorithm preset learns a toy task (one rank, a tiny Llama in
  Megatron-Core, the in-process transformers engine), seconds per preset;
- :mod:`megatron_hapo.demos.rl_demo`: HAPO and DAPO side by side on the whole stack (Megatron TP2, a colocated
  vLLM engine at TP2, a supervised warm-up, evaluations), minutes.
"""
