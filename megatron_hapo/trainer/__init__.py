"""The RL trainer: one step of generate -> reward -> advantages -> update -> weight sync (``step.rl_step``)."""
