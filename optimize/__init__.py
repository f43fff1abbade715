"""Model -> smaller model: a recipe of steps (quantize, prune, distill, low-rank,
share, search), each measured, written as an artifact that ``lmbatch infer`` loads.

Writing the artifact lives here (``artifact.py``); reading it is the actors' business
(``lmbatch.actors.artifact`` and ``load_model``).
"""
