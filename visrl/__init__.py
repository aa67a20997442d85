"""VisRL: intention-driven visual perception for vision-language models.

A model first names the region of the image that matters for the question (a box), then answers
while looking at that region cropped. The package holds every step of the method: data import,
rollouts, judges, preference pairs, SFT / DPO training, merging, evaluation and inference.
It never imports gradio; the app lives in ``visrl_app``.
"""

__version__ = "0.1.0"
