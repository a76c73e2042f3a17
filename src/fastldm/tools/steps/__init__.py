"""Step prediction tooling (StepSaver, Yu & Barad 2024): label prompts with the steps they need
(labels.py) and train the predictor that `steps="auto"` reads (train.py)."""
