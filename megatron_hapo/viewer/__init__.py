"""The rollout viewer: reads a run's dumps (``output.save_rollouts_every``) and writes one offline HTML page
(``tools/inspect_rollouts.py``)."""
