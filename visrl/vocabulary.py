"""The names that several modules, the CLI and the app share, each defined here once.

A config key, a ``click.Choice``, a store column and an app dropdown that list these names import
them from here; ``tests/test_vocabulary.py`` fails when a copy of one appears elsewhere (a tuple or
list literal holding two or more of the names). A new box format, judge or status is one edit
here plus the code that gives it meaning. This module imports nothing, so any module (and the app)
may import it without pulling in models or the store.
"""

from __future__ import annotations

# Box text formats (visrl.boxes converts each; the module doc there shows one of each).
BOX_FORMATS: tuple[str, ...] = ("viscot", "qwen2", "qwen2_5", "qwen3", "normalized")

# Where a prompt puts the question's text relative to its image (visrl.prompts).
PROMPT_LAYOUTS: tuple[str, ...] = ("image_first", "question_first")

# Answer judges (visrl.judges.make_judges): the rule judges score text in microseconds here,
# so a reviewer's edit is re-scored with them (visrl.rescore); ``model`` asks a judge server.
RULE_ANSWER_JUDGES: tuple[str, ...] = ("auto", "exact", "f1", "anls", "number")
ANSWER_JUDGES: tuple[str, ...] = (*RULE_ANSWER_JUDGES, "model")
# Crop judges: ``none`` scores no crop; ``policy`` is a local VLM (visrl.crop_judge).
CROP_JUDGES: tuple[str, ...] = ("none", "iou", "iou_threshold", "model", "policy")

# A rollout's kind (rollouts.kind): each generate attempt stores the policy's first sampled box and a
# second, "bad" one: the second sample, or a random box off the first when the two overlap (DESIGN).
ROLLOUT_KINDS: tuple[str, ...] = ("policy", "negative", "random")
POLICY_ROLLOUT, NEGATIVE_ROLLOUT, RANDOM_ROLLOUT = ROLLOUT_KINDS

# A pair's review status (pairs.status); a pair trains or exports by it.
PAIR_STATUSES: tuple[str, ...] = ("pending", "accepted", "rejected")
DECIDED_PAIR_STATUSES: tuple[str, ...] = PAIR_STATUSES[1:]  # a reviewer has decided these

# A job's status (jobs.status): the first three are live, the last three final.
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "stopping", "succeeded", "failed", "stopped")
ACTIVE_JOB_STATUSES: tuple[str, ...] = JOB_STATUSES[:3]  # a process may still write for these
FINAL_JOB_STATUSES: tuple[str, ...] = JOB_STATUSES[3:]
