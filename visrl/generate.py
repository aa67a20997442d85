"""Self-evolution data generation (DESIGN.md step 2): rollouts -> judges -> preference pairs.

For each item of a dataset split and each of ``attempts`` attempts, the policy samples two box
texts (one prompt, n=2). The first is the *policy* rollout. The second is the *negative* one,
unless it overlaps the first (IoU > :data:`NEGATIVE_MAX_IOU`) or cannot be parsed: then a
*random* box of similar size (each side ±30%) that does not overlap the first takes its place
(:func:`visrl.boxes.random_negative_box`, seeded by (seed, item, attempt)). Every box is
cropped and answered (one batched ``Reasoner.answer`` call per batch); a box text that cannot
be parsed is a failed rollout (no box, no answer, scores 0). Box texts are parsed, random boxes
written and crops cut by the policy's :class:`visrl.contract.TwoStepContract` (``reasoner.contract``:
the checkpoint's, with config overrides), the one inference and training use.

Every rollout lands in the ``rollouts`` table under a ``run_key`` derived from the config (the
model's identity: its weights' fingerprint, not its folder's name (:mod:`visrl.run_identity`);
data, sampling, seed), so a run that is stopped or killed resumes where it stood: the
(item, attempt, kind) already stored are skipped, and the two rollouts of one attempt are
written in one transaction. Judges then score every rollout that lacks a score from the
configured judges (cached per (rollout, judge) in ``judgements``; a judge's key names its
settings, so other judges re-judge the stored rollouts without generating again), and
:mod:`visrl.pairs` turns the run's rollouts into pending pairs. Before any model loads, the
servers the config names are asked whether they answer (:func:`visrl.remote.check_servers`);
a first batch whose box texts mostly fail to parse stops the run (``min_parse_rate``). Crops
are not saved: they are a pure function of the item image and the stored box.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from visrl.boxes import iou, random_negative_box
from visrl.contract import TwoStepContract
from visrl.errors import ConfigError
from visrl.judges import (
    Judge,
    JudgeInput,
    JudgeOptions,
    model_judge_key,
    references,
)
from visrl.pairs import RANDOM_CHOSEN_HELP, UNSCORED, PairsConfig, build_pairs
from visrl.policy import PolicyConfig, check_range, load_reasoner, resolve_model_path  # noqa: F401  (tests patch load_reasoner here)
from visrl.progress import Progress
from visrl.run_identity import policy_identity, run_key
from visrl.run_plan import RunPlan, judges_for, plan_run  # noqa: F401  (RunPlan: re-exported)
from visrl.runtime import seed_everything
from visrl.store import Store, box_from_json, loads
from visrl.vocabulary import (
    ANSWER_JUDGES,
    CROP_JUDGES,
    NEGATIVE_ROLLOUT,
    POLICY_ROLLOUT,
    RANDOM_ROLLOUT,
)
from visrl.workspace import Workspace

NEGATIVE_MAX_IOU = 0.05  # the method: a second sample overlapping the first more is replaced


@dataclass
class GenerateConfig(PolicyConfig):
    """``visrl generate CONFIG``: one YAML key per field. Paths may be workspace-relative."""

    split: str = field(default="train", metadata={"help": "Split of the dataset to generate on."})
    attempts: int = field(default=3, metadata={
        "help": "Attempts per item; each gives a policy rollout and a negative/random one."})
    temperature: float = field(default=1.0, metadata={
        "help": "Box sampling temperature (the paper samples at 2.0 for diverse boxes)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling for boxes (1.0 = off)."})
    answer_temperature: float = field(default=0.0, metadata={
        "help": "Answer-step temperature; 0 = greedy, so an answer's score reflects its crop, not sampling noise."})
    batch_size: int = field(default=8, metadata={
        "help": "Items per batch; one batch asks attempts x 2 boxes per item in one generate call."})
    answer_judge: str = field(default="auto", metadata={
        "help": f"{' | '.join(ANSWER_JUDGES)} (see visrl.judges)."})
    crop_judge: str = field(default="iou", metadata={
        "help": f"{' | '.join(CROP_JUDGES)}; IoU judges apply only to items with an annotated box; policy is "
                "a local model folder (judge_model, visrl.crop_judge)."})
    judge_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible endpoint of the judge model (for 'model' judges)."})
    judge_model: str | None = field(default=None, metadata={
        "help": "Judge model name on that endpoint; with crop_judge: policy, a local model folder "
                "(workspace-relative paths allowed) that judges crops (visrl.crop_judge)."})
    judge_api_key_env: str | None = field(default=None, metadata={
        "help": "NAME of the environment variable holding the judge server's API key (e.g. JUDGE_API_KEY); "
                "never the key itself. null = no key."})
    judge_workers: int = field(default=8, metadata={"help": "Concurrent judge-model requests."})
    anls_threshold: float = field(default=0.5, metadata={"help": "ANLS cut-off (DocVQA uses 0.5)."})
    number_rel_tol: float = field(default=0.05, metadata={"help": "Relative tolerance of numeric answers."})
    iou_threshold: float = field(default=0.5, metadata={"help": "IoU at which 'iou_threshold' scores 1."})
    min_chosen_score: float = field(default=0.8, metadata={"help": "Pairs: chosen answer score at least this."})
    max_rejected_score: float = field(default=0.2, metadata={"help": "Pairs: rejected answer score at most this."})
    min_chosen_crop_score: float = field(default=0.8, metadata={
        "help": "Pairs: chosen crop score at least this (when a crop judge scored it)."})
    max_rejected_crop_score: float = field(default=0.2, metadata={
        "help": "Pairs: rejected crop score at most this (when a crop judge scored it)."})
    random_chosen: bool = field(default=False, metadata={"help": "Pairs: " + RANDOM_CHOSEN_HELP})
    seed: int = field(default=0, metadata={"help": "Seed of sampling and random negative boxes."})
    min_parse_rate: float = field(default=0.2, metadata={
        "help": "Stop when fewer than this fraction of the first batch's box texts parse as boxes "
                "(a wrong box_format, prompt or model); 0 = never stop."})
    run_key: str | None = field(default=None, metadata={
        "help": "Name of this run (resume key); null = derived from the model's weights, data, sampling and seed."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("attempts", "judge_workers"):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        # 0 is greedy; a negative temperature used to run greedy silently. 100 is far past useful.
        check_range("temperature", self.temperature, 0.0, 100.0)
        check_range("answer_temperature", self.answer_temperature, 0.0, 100.0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        for name in ("anls_threshold", "iou_threshold", "min_parse_rate"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("number_rel_tol", self.number_rel_tol, 0.0, 1e6)
        if self.answer_judge not in ANSWER_JUDGES:
            raise ConfigError(f"answer_judge must be one of {', '.join(ANSWER_JUDGES)}, got {self.answer_judge!r}")
        if self.crop_judge not in CROP_JUDGES:
            raise ConfigError(f"crop_judge must be one of {', '.join(CROP_JUDGES)}, got {self.crop_judge!r}")
        self.pairs_config()  # the four pair thresholds, checked by PairsConfig

    def model_label(self) -> str:
        if self.backend == "remote":
            return f"{self.remote_model}@{self.base_url}"
        return self.model_name_or_path + (f"+{self.adapter_name_or_path}" if self.adapter_name_or_path else "")

    def judge_options(self) -> JudgeOptions:
        return JudgeOptions(anls_threshold=self.anls_threshold, number_rel_tol=self.number_rel_tol,
                            iou_threshold=self.iou_threshold, base_url=self.judge_base_url,
                            model=self.judge_model,
                            api_key=model_judge_key(self.judge_api_key_env, self.answer_judge, self.crop_judge))

    def pairs_config(self) -> PairsConfig:
        return PairsConfig(min_chosen_score=self.min_chosen_score, max_rejected_score=self.max_rejected_score,
                           min_chosen_crop_score=self.min_chosen_crop_score,
                           max_rejected_crop_score=self.max_rejected_crop_score,
                           random_chosen=self.random_chosen)


@dataclass
class GenerateReport:
    run_key: str
    items: int  # items in the selection
    items_done_before: int  # fully generated by an earlier (resumed) run
    items_generated: int  # items that got new rollouts now
    rollouts: int  # new rollouts now
    failed: int  # new rollouts whose box text did not parse
    parse_rate: float  # parsed / sampled box texts, new policy and negative samples
    pairs: int  # pairs added now
    pairs_total: int  # pairs of this run, now
    unscored: int  # rollouts of this run a judge model replied to without a score: dropped, not 0.0
    seconds: float
    items_per_s: float
    rollouts_per_s: float
    stopped: bool
    rejudged: int = 0  # rollouts stored by earlier runs of this key, judged now (the judges changed)


def run_key_for(cfg: GenerateConfig, workspace: Workspace | None = None,
                identity: dict[str, Any] | None = None) -> str:
    """A short stable name of what makes rollouts differ: the model's identity (its weights'
    fingerprint; name and URL when remote), data, sampling, seed.

    ``workspace`` is where relative model paths are looked up (as the run loads them); without
    it a model that is only found there counts as absent. ``identity``: a
    :func:`visrl.run_identity.policy_identity` already computed.
    """
    return run_key(cfg, identity if identity is not None else policy_identity(cfg, workspace))


def _sampling(temperature: float, top_p: float, max_new_tokens: int, n: int) -> Any:
    from visrl.reasoning import Sampling

    return Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=n)


# ---------------------------------------------------------------------- the run

def run_generate(workspace: str | Path | Workspace | None, cfg: GenerateConfig,
                 progress: Progress | None = None, job_id: int | None = None,
                 reasoner: Any = None) -> GenerateReport:
    """Generate, judge and pair one dataset split; resumable (see module doc).

    ``reasoner`` replaces the configured policy (tests, benchmarks); ``progress`` counts items
    and is checked for a stop request between batches. One run per run key at a time: a second
    one gets a :class:`~visrl.errors.JobError` ("already running") before any model loads.
    """
    store = Store.open(workspace)
    identity = policy_identity(cfg, store.workspace)
    with store.acquire_lease(f"generate:{cfg.run_key or run_key_for(cfg, identity=identity)}", job_id=job_id):
        return _run_generate(store.workspace, cfg, progress, job_id, reasoner, identity)


def _run_generate(workspace: Workspace, cfg: GenerateConfig, progress: Progress | None,
                  job_id: int | None, reasoner: Any, identity: dict[str, Any]) -> GenerateReport:
    store = Store.open(workspace)
    ws = store.workspace
    answer_judge, crop_judge = judges_for(ws, cfg)
    plan = plan_run(store, cfg, identity)
    run_key, items, todo, pending = plan.run_key, plan.items, plan.todo, plan.pending
    if plan.has_work:  # asked in seconds, before minutes of model loading or hours of sampling
        from visrl.remote import check_servers, servers_of

        check_servers(servers_of(cfg, policy=bool(pending) and reasoner is None))
    store.record_generate_run(run_key, plan.lineage, cfg.model_label(), identity)
    if progress is not None:  # the bar counts new work only: items done by earlier runs are not progress
        progress.set_total(len(pending))
        progress.update(step=0, force=True)
        progress.message(plan.summary())  # in the terminal too: a new run (model changed) or a re-judge says so
    if pending and reasoner is None:
        reasoner = load_reasoner(ws, cfg)
        from visrl.train.merge import merge_reasoner_adapter

        merge_reasoner_adapter(reasoner)  # sampling through merged weights: 1.34x faster
    start = time.monotonic()
    counts: dict[str, Any] = {"rollouts": 0, "failed": 0, "samples": 0, "parsed": 0, "items": 0}
    for i in range(0, len(pending), cfg.batch_size):
        if progress is not None and progress.stop_requested:
            break
        batch = pending[i:i + cfg.batch_size]
        _generate_batch(store, ws, reasoner, cfg, run_key, batch, todo, job_id, counts)
        if i == 0:
            _check_parse_rate(cfg, counts, batch, todo)
        judge_rollouts(store, run_key, answer_judge, crop_judge, cfg.judge_workers,
                       item_ids=[item["id"] for item in batch], contract=reasoner.contract)
        counts["items"] += len(batch)
        if progress is not None:
            elapsed = max(time.monotonic() - start, 1e-9)
            progress.update(advance=len(batch), metrics={
                "items_per_s": counts["items"] / elapsed,
                "parse_rate": counts["parsed"] / max(counts["samples"], 1)})
    # Rollouts of earlier runs judged by other judges (or killed before judging) get scored too.
    rejudged = judge_rollouts(store, run_key, answer_judge, crop_judge, cfg.judge_workers,
                              contract=reasoner.contract if reasoner is not None else
                              _judge_contract(ws, cfg, crop_judge))
    pairs = build_pairs(store, cfg.pairs_config(), run_key=run_key, source=run_key)
    seconds = time.monotonic() - start
    if progress is not None and not progress.stop_requested:  # the job's last word, shown in the app
        progress.message(plan.summary() if not pending else
                         f"{pairs.pairs_added} new pairs from {counts['items']} new items "
                         f"({pairs.pairs_total} pairs in run {run_key})")
    return GenerateReport(
        run_key=run_key, items=len(items), items_done_before=len(items) - len(pending),
        items_generated=counts["items"], rollouts=counts["rollouts"], failed=counts["failed"],
        parse_rate=round(counts["parsed"] / max(counts["samples"], 1), 4),
        pairs=pairs.pairs_added, pairs_total=pairs.pairs_total, unscored=pairs.unscored,
        seconds=round(seconds, 3),
        items_per_s=round(counts["items"] / max(seconds, 1e-9), 3),
        rollouts_per_s=round(counts["rollouts"] / max(seconds, 1e-9), 3),
        stopped=counts["items"] < len(pending), rejudged=rejudged)


def _check_parse_rate(cfg: GenerateConfig, counts: dict[str, Any], batch: list[dict[str, Any]],
                      todo: dict[int, list[int]]) -> None:
    """Stop after the first batch when too few box texts parsed: a wrong box format, prompt or
    model gives hours of failed rollouts and no pairs (its rollouts are kept; a fixed config
    is another run, or the same one resumed)."""
    samples, parsed = counts["samples"], counts["parsed"]
    if not samples or parsed / samples >= cfg.min_parse_rate:
        return
    example = counts.get("example_failure") or ""
    raise ConfigError(
        f"only {parsed} of {samples} box texts ({parsed / samples:.0%}) of the first batch "
        f"({len(batch)} items, {sum(len(todo[i['id']]) for i in batch)} attempts) parsed as boxes, below "
        f"min_parse_rate {cfg.min_parse_rate:g}; check box_format (the config's, else the checkpoint's "
        f"visrl_model.json), that the model was trained on VisRL's box prompt, and that "
        f"{cfg.model_label()} is the model meant (e.g. the SFT-merged one). One reply: {example[:120]!r}. "
        "Set min_parse_rate: 0 to generate anyway")


def _judge_contract(ws: Workspace, cfg: GenerateConfig, crop_judge: Judge | None) -> TwoStepContract | None:
    """Without a loaded policy, a judge model still sees the policy's crop: the checkpoint's
    contract from its files (None, the default crop, when they cannot be read)."""
    if crop_judge is None or not crop_judge.needs_image:
        return None  # IoU judges never look at the crop
    from visrl.errors import VisRLError
    from visrl.policy import policy_contract

    try:
        return policy_contract(ws, cfg)
    except (VisRLError, OSError, ValueError):  # no model files here (moved, or a test's fake name)
        return None


@dataclass
class _Unit:
    """One (item, attempt) of a batch and its two rollouts as they are built."""

    item: dict[str, Any]
    attempt: int
    image: Image.Image
    rollouts: list[dict[str, Any]] = field(default_factory=list)


def _generate_batch(store: Store, ws: Workspace, reasoner: Any, cfg: GenerateConfig, run_key: str,
                    batch: list[dict[str, Any]], todo: dict[int, list[int]], job_id: int | None,
                    counts: dict[str, Any]) -> None:
    """Sample boxes for every pending attempt of ``batch``, answer every crop, store all."""
    contract: TwoStepContract = reasoner.contract
    units = []
    for item in batch:
        image = load_image(ws, item)
        units += [_Unit(item, attempt, image) for attempt in todo[item["id"]]]
    # Seeded by the config's seed and the batch's (item, attempt) units: the same config gives the
    # same rollouts on one device, and a resumed run re-forms the same batches (a batch is stored
    # whole or not at all), so it gives what an uninterrupted run would.
    seed_everything(cfg.seed, *[(u.item["id"], u.attempt) for u in units])
    texts = reasoner.propose_boxes([u.image for u in units], [u.item["question"] for u in units],
                                   _sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, 2))
    crops: list[tuple[dict[str, Any], _Unit, Image.Image]] = []
    for unit, samples in zip(units, texts, strict=True):
        samples = (list(samples) + ["", ""])[:2]  # a backend that returned fewer: failed samples
        unit.rollouts = _attempt_rollouts(unit, samples, cfg, contract, run_key, job_id, counts)
        crops += [(r, unit, contract.crop(unit.image, r["box"])) for r in unit.rollouts if r["box"] is not None]
    if crops:
        answers = reasoner.answer(
            [u.image for _, u, _ in crops], [u.item["question"] for _, u, _ in crops],
            [r["box_text"] for r, _, _ in crops], [c for _, _, c in crops],
            _sampling(cfg.answer_temperature, 1.0, cfg.max_new_tokens, 1))
        for (rollout, _, _), answer in zip(crops, answers, strict=True):
            rollout["answer"] = answer[0] if isinstance(answer, list) else answer
    with store.atomic():  # both rollouts of an attempt land together, or neither
        for unit in units:
            for rollout in unit.rollouts:
                store.add_rollout(rollout)
                counts["rollouts"] += 1


def _attempt_rollouts(unit: _Unit, samples: list[str], cfg: GenerateConfig, contract: TwoStepContract,
                      run_key: str, job_id: int | None, counts: dict[str, Any]) -> list[dict[str, Any]]:
    """The policy rollout and the negative (or random) rollout of one attempt; not yet answered."""
    size = unit.image.size  # the image the policy saw; the store's width/height describe the same file
    first = contract.parse(samples[0], size)
    second = contract.parse(samples[1], size)
    counts["samples"] += 2
    counts["parsed"] += (first is not None) + (second is not None)
    if "example_failure" not in counts and (first is None or second is None):  # for the parse-rate error
        counts["example_failure"] = samples[0] if first is None else samples[1]
    base = {"run_key": run_key, "item_id": unit.item["id"], "attempt": unit.attempt,
            "model": cfg.model_label(), "job_id": job_id, "answer": None}
    policy = {**base, "kind": POLICY_ROLLOUT, "box_text": samples[0], "box": first}
    if first is not None and (second is None or iou(first, second) > NEGATIVE_MAX_IOU):
        # An unparseable second sample is replaced as well: a rejected side without a box gives
        # the curator nothing to look at and stage 2 no crop to answer on.
        rng = random.Random(f"{cfg.seed}/{unit.item['id']}/{unit.attempt}")
        box = random_negative_box(first, size, rng)
        negative = {**base, "kind": RANDOM_ROLLOUT, "box_text": contract.format(box, size), "box": box}
    else:
        negative = {**base, "kind": NEGATIVE_ROLLOUT, "box_text": samples[1], "box": second}
    for rollout in (policy, negative):
        if rollout["box"] is None:
            counts["failed"] += 1
            rollout.update(answer_score=0.0, crop_score=0.0, scores=json.dumps({"failed": 0.0}))
    return [policy, negative]


def load_image(ws: Workspace, item: dict[str, Any]) -> Image.Image:
    with Image.open(ws.absolute(item["image"])) as image:
        return image.convert("RGB")


# ---------------------------------------------------------------------- judging

def judge_rollouts(store: Store, run_key: str, answer_judge: Judge, crop_judge: Judge | None,
                   workers: int = 8, item_ids: list[int] | None = None,
                   contract: TwoStepContract | None = None) -> int:
    """Score the run's rollouts that lack a score from these judges; returns how many changed.

    Cached judgements (``judgements`` table) are reused; the rest run concurrently (judge models
    are network calls) and are written from this thread in one transaction. A judge model sees
    the crop ``contract`` cuts (the policy's; default: no margin).
    """
    contract = contract or TwoStepContract()
    judges = [j for j in (answer_judge, crop_judge) if j is not None]
    rows = store.rollouts(run_key=run_key, item_ids=item_ids)
    rollouts = [r for r in rows if r["box"] and not all(j.key in loads(r["scores"], {}) for j in judges)]
    if not rollouts:
        return 0
    items = {i: store.item(i) for i in {r["item_id"] for r in rollouts}}
    ws = store.workspace
    tasks, results = [], {}
    for rollout in rollouts:
        for judge in judges:
            cached = store.cached_judgement(rollout["id"], judge.key)
            if cached is None:
                tasks.append((rollout, judge))
            else:
                results[(rollout["id"], judge.key)] = (cached, None)
    images: dict[int, Image.Image] = {}
    # Only judges that look at pixels (remote judge models, visrl.crop_judge) get images and crops.
    needs_image = any(judge.needs_image for _, judge in tasks)
    inputs = {r["id"]: _judge_input(ws, items[r["item_id"]], r, images if needs_image else None, contract)
              for r in rollouts}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = pool.map(lambda task: task[1](inputs[task[0]["id"]]), tasks)
        for (rollout, judge), judgement in zip(tasks, outcomes, strict=True):
            results[(rollout["id"], judge.key)] = (
                None if judgement is None else judgement.score, judgement)
    with store.atomic():
        for rollout in rollouts:
            _save_scores(store, items[rollout["item_id"]], rollout, answer_judge, crop_judge, results)
    return len(rollouts)


def _judge_input(ws: Workspace, item: dict[str, Any], rollout: dict[str, Any],
                 images: dict[int, Image.Image] | None, contract: TwoStepContract) -> JudgeInput:
    box = box_from_json(rollout["box"])
    image = crop = None
    if images is not None and box is not None:
        if item["id"] not in images:
            images[item["id"]] = load_image(ws, item)
        image = images[item["id"]]
        crop = contract.crop(image, box)
    return JudgeInput(question=item["question"], references=references(item), answer=rollout["answer"],
                      box=box, gt_box=box_from_json(item.get("gt_box")), image=image, crop=crop)


def _save_scores(store: Store, item: dict[str, Any], rollout: dict[str, Any], answer_judge: Judge, crop_judge: Judge | None,
                 results: dict[tuple[int, str], tuple[float | None, Any]]) -> None:
    scores = loads(rollout["scores"], {})
    unscored = set(scores.pop(UNSCORED, []))
    judges = [j for j in (answer_judge, crop_judge) if j is not None]
    for judge in judges:
        score, judgement = results[(rollout["id"], judge.key)]
        if judgement is not None:  # freshly computed: cache it
            store.save_judgement(rollout["id"], judge.key, judgement.score, judgement.detail)
            # Replied without a score: pairs.py drops the rollout (never a 0.0 side).
            unscored = unscored - {judge.key} | ({judge.key} if judgement.score is None else set())
        scores[judge.key] = score
    unscored &= {j.key for j in judges}  # a judge no longer used cannot hold the rollout back
    if unscored:
        scores[UNSCORED] = sorted(unscored)
    gt = box_from_json(item.get("gt_box"))
    box = box_from_json(rollout["box"])
    store.update_rollout(
        rollout["id"], scores=scores, answer_score=scores[answer_judge.key],
        crop_score=None if crop_judge is None else scores[crop_judge.key],
        iou=None if gt is None or box is None else round(iou(box, gt), 4))

