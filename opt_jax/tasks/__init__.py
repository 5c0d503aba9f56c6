"""Fine-tuning tasks beyond language modelling: text classification (classification.py),
SQuAD-style extractive QA (squad.py) and built-in offline datasets of both (builtin.py)."""
