"""Local training of one client: the round's spec and hooks (spec.py), the engines
(torch_engine.py, deepspeed_engine.py) behind one registry (engines.py), and the
built-in base model's warm start (warm_start.py)."""
