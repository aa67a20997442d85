"""What a judge is given and what it returns: the types :mod:`visrl.judges` (rule and model judges)
and :mod:`visrl.crop_judge` (the policy crop judge) share.

They live apart from both so that each judge module imports them, and ``judges`` imports
``crop_judge`` (to build a policy judge), with no import running the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from visrl.boxes import Box


@dataclass
class JudgeInput:
    """What a judge sees of one rollout. Boxes are pixels of the original image."""

    question: str
    references: list[str]  # the reference answer and any accepted alternatives
    answer: str | None
    box: Box | None = None
    gt_box: Box | None = None
    image: Image.Image | None = None  # set only for judges whose needs_image is True
    crop: Image.Image | None = None


@dataclass(frozen=True)
class Judgement:
    score: float | None  # in [0, 1]; None: the judge replied without a usable score (unscored)
    detail: str = ""


class Judge:
    """Scores one rollout. Each judge sets :attr:`key` and :attr:`needs_image` and implements
    ``__call__`` (None: nothing to judge, e.g. no annotated box for an IoU judge)."""

    key: str  # cache key in the ``judgements`` table; changes whenever the options do
    # True: generation loads the item's image and crops it for this judge (JudgeInput.image and
    # .crop); a text or box judge leaves them None and no image is read for it.
    needs_image: bool = False

    def __call__(self, inp: JudgeInput) -> Judgement | None:
        raise NotImplementedError
