"""The app's handlers, driven without a browser, on a temporary workspace seeded with pairs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visrl import review
from visrl.boxes import Box
from visrl.store import Store
from visrl.workspace import Workspace

FILTERS = ("pending", "any", None, None, "", "oldest")  # status, dataset, min/max margin, search, sort
NO_EDITS = (None, None, None)  # annotator value, chosen answer, rejected answer: nothing edited


def seed_pairs(root: Path, n: int = 4, size: tuple[int, int] = (320, 240)) -> Workspace:
    """A workspace with one dataset, ``n`` items (a red square on grey) and one pair per item."""
    ws = Workspace.open(root)
    store = Store(ws)
    ds = store.add_dataset("shapes", "test")
    items = []
    for i in range(n):
        image = Image.new("RGB", size, (200, 200, 200))
        x = 20 + 40 * i
        image.paste((220, 30, 30), (x, 60, x + 60, 120))
        rel = f"images/item{i}.png"
        image.save(ws.root / rel)
        items.append({"split": "train", "source_id": str(i), "image": rel, "width": size[0],
                      "height": size[1], "question": f"What colour is square {i}?", "answer": "red",
                      "gt_box": Box(x, 60, x + 60, 120)})
    ids = store.add_items(ds, items)
    for i, item_id in enumerate(ids):
        x = 20 + 40 * i
        chosen = {"item_id": item_id, "attempt": 0, "kind": "policy", "box": Box(x + 2, 58, x + 62, 122),
                  "answer": "red", "answer_score": 1.0 - 0.1 * i, "crop_score": 0.9}
        rejected = {"item_id": item_id, "attempt": 0, "kind": "negative", "box": Box(200, 150, 300, 230),
                    "answer": "grey", "answer_score": 0.0, "crop_score": 0.0}
        c_id, r_id = store.add_rollout(chosen), store.add_rollout(rejected)
        review.add_pair(store, item_id, store.db["rollouts"].get(c_id), store.db["rollouts"].get(r_id), "seed")
    return ws


@pytest.fixture
def ctx(tmp_path: Path) -> Any:
    from visrl_app.context import AppContext

    return AppContext.open(seed_pairs(tmp_path / "ws"))


def view_dict(outputs: tuple[Any, ...]) -> dict[str, Any]:
    names = ["annotated", "chosen_crop", "rejected_crop", "info", "chosen_answer", "rejected_answer",
             "progress", "ticket", "history", "state"]
    return dict(zip(names, outputs, strict=True))


def test_import_app_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, visrl_app.app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_first_pair_view_shows_boxes_crops_and_progress(ctx: Any) -> None:
    from visrl_app import pairs_tab, render

    view = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))
    first = review.get_pair(ctx.store, view["state"]["pair_id"])
    assert view["state"]["version"] == 1 and first["id"] == 1  # sort "oldest"
    boxes = view["annotated"]["boxes"]
    assert [(b["label"], b["color"]) for b in boxes] == [("chosen", render.GREEN), ("rejected", render.RED)]
    # The image is shown resized to fit 640x440 (here x1.83) with a 24-row band above it, so a
    # label over a box at the top edge shows; boxes are sent in those display pixels.
    scale, pad = view["state"]["scale"], view["state"]["pad"]
    assert (round(scale, 4), pad) == (round(440 / 240, 4), 24) == (round(render.display_geometry((320, 240))[0], 4), 24)
    assert [boxes[0][k] for k in ("xmin", "ymin", "xmax", "ymax")] == [
        round(22 * scale), round(58 * scale + pad), round(82 * scale), round(122 * scale + pad)]
    shown = Image.open(view["annotated"]["image"])  # a file: gradio serves it without re-encoding
    assert shown.size == (round(320 * scale), round(240 * scale) + pad)
    assert shown.getpixel((5, 2)) == (241, 245, 249)  # the label band
    # the dashed blue gt box is drawn on the displayed image (at its top-left corner: x=20, y=60)
    assert shown.getpixel((round(21 * scale), round(60 * scale) + pad))[2] > 150
    assert Image.open(view["chosen_crop"]).size == (60, 64) and Image.open(view["rejected_crop"]).size == (100, 80)
    assert view["chosen_answer"] == "red" and view["rejected_answer"] == "grey"
    assert "Reviewed 0 / 4" in view["progress"] and "pending 4" in view["progress"]
    assert "What colour is square 0?" in view["info"]


def test_accept_advances_and_records_version(ctx: Any) -> None:
    from visrl_app import pairs_tab

    state = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))["state"]
    view = view_dict(pairs_tab.act(ctx, "accept", state, *NO_EDITS, *FILTERS))
    assert review.get_pair(ctx.store, 1)["status"] == "accepted"
    assert view["state"]["pair_id"] == 2  # moved on to the next pending pair
    view = view_dict(pairs_tab.act(ctx, "reject", view["state"], *NO_EDITS, *FILTERS))
    assert review.get_pair(ctx.store, 2)["status"] == "rejected"
    assert "Reviewed 2 / 4" in view["progress"]


def test_swap_undo_and_navigation(ctx: Any) -> None:
    from visrl_app import pairs_tab

    state = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))["state"]
    view = view_dict(pairs_tab.act(ctx, "swap", state, *NO_EDITS, *FILTERS))
    assert view["state"] == {**view["state"], "pair_id": 1, "version": 2}
    assert view["chosen_answer"] == "grey"
    view = view_dict(pairs_tab.act(ctx, "undo", view["state"], *NO_EDITS, *FILTERS))
    assert view["chosen_answer"] == "red" and view["state"]["version"] == 3
    nxt = view_dict(pairs_tab.navigate(ctx, False, view["state"], *NO_EDITS, *FILTERS))
    assert nxt["state"]["pair_id"] == 2
    back = view_dict(pairs_tab.navigate(ctx, True, nxt["state"], *NO_EDITS, *FILTERS))
    assert back["state"]["pair_id"] == 1
    # at the start, "previous" stays on the first pair
    assert view_dict(pairs_tab.navigate(ctx, True, back["state"], *NO_EDITS, *FILTERS))["state"]["pair_id"] == 1


def test_conflict_warns_and_reloads(ctx: Any) -> None:
    from visrl_app import pairs_tab

    state = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))["state"]
    review.reject(ctx.store, 1, 1, reviewer="someone-else")
    with pytest.warns(UserWarning, match="changed by someone else"):
        view = view_dict(pairs_tab.act(ctx, "accept", state, *NO_EDITS, *FILTERS))
    assert review.get_pair(ctx.store, 1)["status"] == "rejected"
    assert view["state"]["pair_id"] == 1 and view["state"]["version"] == 2  # reloaded


def shown(box: Box, state: dict[str, Any], label: str) -> dict[str, Any]:
    """``box`` (original pixels) as the annotator would send it back: display pixels, rounded."""
    from visrl_app import render

    d = render.to_display(box, state["scale"], state["pad"])
    return {"xmin": round(d.x1), "ymin": round(d.y1), "xmax": round(d.x2), "ymax": round(d.y2), "label": label}


def test_save_boxes_reads_labels_and_pixels(ctx: Any) -> None:
    from visrl_app import pairs_tab

    view = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))
    state = view["state"]
    boxes = [{**b} for b in view["annotated"]["boxes"]]
    boxes[1] = shown(Box(10, 20, 110, 140), state, "rejected")  # the rejected box, dragged
    view = view_dict(pairs_tab.save_boxes(ctx, state, {"image": None, "boxes": boxes}, *FILTERS))
    pair = review.get_pair(ctx.store, 1)
    # display pixels are 1/1.83 original pixels: the box comes back within 0.3 px
    assert review.pair_boxes(pair)["rejected"].as_list() == pytest.approx([10, 20, 110, 140], abs=0.3)
    assert review.pair_boxes(pair)["chosen"] == Box(22, 58, 82, 122)  # unchanged: not re-saved
    assert pair["version"] == 2 and pair["edited"] == 1 and "saved rejected box" in view["ticket"]
    three = [{**boxes[0], "xmin": x} for x in (1, 2, 3)]
    with pytest.warns(UserWarning, match="3 boxes are labelled 'chosen'; delete the extra ones"):
        pairs_tab.save_boxes(ctx, view["state"], {"boxes": three}, *FILTERS)
    assert review.get_pair(ctx.store, 1)["version"] == 2


@pytest.mark.parametrize("case", ["replace", "deleted side", "rotated", "top edge"])
def test_new_deleted_rotated_and_edge_boxes(ctx: Any, case: str) -> None:
    """A new box (the annotator labels it "chosen") replaces the chosen box, or takes the side
    whose box was deleted; boxes drawn on a rotated view are stored unrotated; a box dragged
    into the label band above the image is clamped onto the image."""
    from visrl_app import pairs_tab

    view = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))
    state = view["state"]
    chosen, rejected = view["annotated"]["boxes"]
    new = shown(Box(100, 100, 150, 160), state, "chosen")
    value: dict[str, Any] = {"boxes": [chosen, rejected, new]}
    expected = {"chosen": Box(100, 100, 150, 160), "rejected": Box(200, 150, 300, 230)}
    if case == "deleted side":
        value = {"boxes": [chosen, new]}
        expected = {"chosen": Box(22, 58, 82, 122), "rejected": Box(100, 100, 150, 160)}
    elif case == "rotated":  # one clockwise quarter turn of the displayed image: x' = H - y, y' = x
        height = Image.open(view["annotated"]["image"]).height
        moved = shown(Box(190, 150, 300, 230), state, "rejected")
        turned = [{"label": b["label"], "xmin": height - b["ymax"], "ymin": b["xmin"], "xmax": height - b["ymin"],
                   "ymax": b["xmax"]} for b in (chosen, moved)]
        value = {"boxes": turned, "orientation": 1}
        expected = {"chosen": Box(22, 58, 82, 122), "rejected": Box(190, 150, 300, 230)}
    elif case == "top edge":
        value = {"boxes": [{**chosen, "ymin": 3}, rejected]}
        expected = {"chosen": Box(22, 0, 82, 122), "rejected": Box(200, 150, 300, 230)}
    pairs_tab.save_boxes(ctx, state, value, *FILTERS)
    boxes = review.pair_boxes(review.get_pair(ctx.store, 1))
    for side, box in expected.items():  # display pixels are 1/1.83 original pixels: within 0.3
        assert boxes[side].as_list() == pytest.approx(box.as_list(), abs=0.3), side


def test_edits_are_saved_before_moving_on(ctx: Any) -> None:
    from visrl_app import pairs_tab

    view = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))
    edits = (view["annotated"], "crimson", "grey")  # typed an answer, boxes untouched
    view = view_dict(pairs_tab.navigate(ctx, False, view["state"], *edits, *FILTERS))
    assert review.get_pair(ctx.store, 1)["chosen_answer"] == "crimson"
    assert view["state"]["pair_id"] == 2 and "saved chosen answer" in view["ticket"]
    # Accept with a typed answer: the edit and the accept are both stored, in that order.
    view = view_dict(pairs_tab.act(ctx, "accept", view["state"], None, "ruby", None, *FILTERS))
    assert [r["action"] for r in review.reviews(ctx.store, 2)] == ["edit_chosen_answer", "accept"]
    assert review.get_pair(ctx.store, 2)["chosen_answer"] == "ruby" and view["state"]["pair_id"] == 3
    # An edit that cannot be stored keeps the desk on the pair, with the edit, and warns.
    with pytest.warns(UserWarning, match="an answer cannot be empty"):
        stay = view_dict(pairs_tab.navigate(ctx, False, view["state"], None, "   ", None, *FILTERS))
    assert stay["state"]["pair_id"] == 3 and stay["chosen_answer"] == {"__type__": "update"}
    assert review.reviews(ctx.store, 3) == []


def test_undo_discards_unsaved_edits_then_reverts_only_this_tab(ctx: Any) -> None:
    from visrl_app import pairs_tab

    view = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state("ana"), *NO_EDITS, *FILTERS))
    view = view_dict(pairs_tab.act(ctx, "swap", view["state"], *NO_EDITS, *FILTERS))
    undo = view_dict(pairs_tab.act(ctx, "undo", view["state"], None, "typed, not saved", None, *FILTERS))
    assert "Discarded your unsaved edits to pair 1" in undo["ticket"] and undo["chosen_answer"] == "grey"
    assert review.get_pair(ctx.store, 1)["version"] == 2  # the swap stands
    undo = view_dict(pairs_tab.act(ctx, "undo", undo["state"], *NO_EDITS, *FILTERS))
    assert "Undone: ana's swap sides" in undo["ticket"] and "pair 1 is back as it was before" in undo["ticket"]
    assert undo["chosen_answer"] == "red"
    # Another tab (same reviewer) accepts pair 1; a freshly loaded tab has nothing to undo.
    review.accept(ctx.store, 1, 3, reviewer="ana")
    fresh = view_dict(pairs_tab.load(ctx, pairs_tab.empty_state("ana"), *FILTERS))
    with pytest.warns(UserWarning, match="nothing of yours to undo in this tab"):
        pairs_tab.act(ctx, "undo", fresh["state"], *NO_EDITS, *FILTERS)
    assert review.get_pair(ctx.store, 1)["status"] == "accepted"


def test_reviewer_claims_history_and_jump(ctx: Any) -> None:
    from types import SimpleNamespace

    from visrl_app import pairs_tab

    assert ctx.user  # --user, $VISRL_USER or the OS login
    ana = view_dict(pairs_tab.load(ctx, pairs_tab.empty_state(), *FILTERS, request=SimpleNamespace(username="ana")))
    bo = view_dict(pairs_tab.load(ctx, pairs_tab.empty_state(), *FILTERS, request=SimpleNamespace(username="bo")))
    assert (ana["state"]["reviewer"], bo["state"]["reviewer"]) == ("ana", "bo")
    assert (ana["state"]["pair_id"], bo["state"]["pair_id"]) == (1, 2)  # pair 1 is on ana's screen
    ana = view_dict(pairs_tab.act(ctx, "accept", ana["state"], *NO_EDITS, *FILTERS))
    assert ana["state"]["pair_id"] == 3  # 2 is on bo's screen
    assert review.reviews(ctx.store, 1)[0]["reviewer"] == "ana"
    assert "ana: 1 accepted, 0 rejected" in ana["progress"]
    bo = view_dict(pairs_tab.act(ctx, "reject", bo["state"], *NO_EDITS, *FILTERS))
    assert "Team: ana 1 accepted, 0 rejected" in bo["progress"]
    jumped = view_dict(pairs_tab.jump(ctx, bo["state"], *NO_EDITS, "#1", *FILTERS))
    assert jumped["state"]["pair_id"] == 1 and "jumped to pair 1" in jumped["ticket"]
    assert "| ana | accept (status pending -> accepted) |" in jumped["history"]
    with pytest.warns(UserWarning, match="no pair with id 99"):
        pairs_tab.jump(ctx, bo["state"], *NO_EDITS, "99", *FILTERS)


def test_bulk_preview_confirm_and_undo(ctx: Any) -> None:
    from visrl_app import pairs_tab

    state = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state("ana"), *NO_EDITS, *FILTERS))["state"]
    with pytest.warns(UserWarning, match="preview the bulk action"):
        pairs_tab.bulk(ctx, "confirm", state, "accept", *FILTERS)
    message, state = pairs_tab.bulk_preview(ctx, state, "accept", *FILTERS)
    assert "**4** pairs match the filters" in message
    with pytest.warns(UserWarning, match="preview the bulk action"):  # another action than previewed
        pairs_tab.bulk(ctx, "confirm", state, "reject", *FILTERS)
    *outputs, message = pairs_tab.bulk(ctx, "confirm", state, "accept", *FILTERS)
    assert "Done: **4** pairs" in message and review.status_counts(ctx.store)["accepted"] == 4
    view = view_dict(tuple(outputs))
    assert view["state"]["pair_id"] is None and "pending 0" in view["progress"]
    *outputs, message = pairs_tab.bulk(ctx, "undo", view["state"], "accept", *FILTERS)
    assert "**4** pairs reverted" in message and review.status_counts(ctx.store)["pending"] == 4


def test_save_answers_and_filters(ctx: Any) -> None:
    from visrl_app import pairs_tab

    view = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))
    view = view_dict(pairs_tab.save_answers(ctx, view["state"], "red", "blue", *FILTERS))
    assert review.get_pair(ctx.store, 1)["rejected_answer"] == "blue"
    assert review.get_pair(ctx.store, 1)["chosen_answer"] == "red"
    searched = view_dict(pairs_tab.show_first(ctx, view["state"], *NO_EDITS, "any", "shapes", None, None, "square 3", "priority"))
    assert searched["state"]["pair_id"] == 4
    narrow = view_dict(pairs_tab.show_first(ctx, view["state"], *NO_EDITS, "any", "any", 0.85, None, "", "priority"))
    assert narrow["state"]["pair_id"] == 2  # margins 1.0, 0.9, 0.8, 0.7: >= 0.85 -> pairs 1, 2; priority: smaller margin first
    empty = view_dict(pairs_tab.show_first(ctx, view["state"], *NO_EDITS, "accepted", "any", None, None, "", "priority"))
    assert empty["state"]["pair_id"] is None and "All done" in empty["info"]


@pytest.mark.parametrize(("host", "auth", "ok"), [
    ("127.0.0.1", None, True), ("localhost", None, True), ("::1", None, True),
    ("0.0.0.0", None, False), ("192.168.1.5", None, False), ("0.0.0.0", ("u", "p"), True),
])
def test_check_bind(host: str, auth: tuple[str, str] | None, ok: bool) -> None:
    from visrl.errors import ConfigError
    from visrl_app.app import check_bind

    if ok:
        check_bind(host, auth)
    else:
        with pytest.raises(ConfigError, match="--auth"):
            check_bind(host, auth)


def test_auth_takes_one_login_per_reviewer_from_flags_and_a_file(tmp_path: Path) -> None:
    from visrl_app.app import parse_auth

    logins = tmp_path / "logins.txt"
    logins.write_text("# the curation team\nana:pw:with:colons\n\n  bo:pw-bo  \n", encoding="utf-8")
    assert parse_auth(None) is None and parse_auth(()) is None
    assert parse_auth("u:p") == [("u", "p")]
    assert parse_auth(("cy:pw-cy",), logins) == [("cy", "pw-cy"), ("ana", "pw:with:colons"), ("bo", "pw-bo")]


@pytest.mark.parametrize(("entries", "message"), [
    (("ana",), "login 1 must be USER:PASSWORD"),
    (("ana:pw", ":pw"), "login 2 must be USER:PASSWORD"),
    (("ana:pw", "ana:other"), "login 'ana' is given twice"),
])
def test_bad_logins_are_named(entries: tuple[str, ...], message: str) -> None:
    from visrl.errors import ConfigError
    from visrl_app.app import parse_auth

    with pytest.raises(ConfigError, match=message):
        parse_auth(entries)


def test_cli_refuses_public_host_without_auth(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "visrl_app.main", "--workspace", str(tmp_path / "w"),
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a password" in out.stderr


def test_build_app_has_every_tab(ctx: Any) -> None:
    import gradio as gr

    from visrl_app.app import build_app

    blocks = build_app(ctx.workspace)
    tabs = [b.label for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Pairs", "Generate", "Train", "Evaluate", "Chat"]
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"pairs-accept", "pairs-reject", "pairs-swap", "pairs-undo", "pairs-next", "pairs-prev",
            "pairs-save-boxes", "pairs-save-answers", "train-start", "train-stop", "chat-ask"} <= ids


def test_every_chart_starts_at_zero(ctx: Any) -> None:
    """Loss curves and evaluation bars: a y axis fitted to the data makes a 20 % change look total."""
    import gradio as gr

    from visrl_app.app import build_app

    blocks = build_app(ctx.workspace)
    plots = {b.elem_id: b.y_lim for b in blocks.blocks.values() if isinstance(b, (gr.LinePlot, gr.BarPlot))}
    assert {"train-loss"} <= set(plots)
    assert all(y_lim is not None and y_lim[0] == 0 for y_lim in plots.values()), plots
    # The Evaluate chart is HTML with error bars (visrl_app.eval_chart): its axis starts at 0 too.
    chart = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "eval-plot")
    assert isinstance(chart, gr.HTML)


def model_folder(ctx: Any, name: str) -> None:
    """A folder validation accepts as a model (config.json of a supported family); nothing loads it."""
    folder = ctx.root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "qwen2_vl"}')


def test_train_recipe_validation(ctx: Any) -> None:
    from visrl_app import train_tab

    stage = "sft"
    files = train_tab.recipe_files(ctx, stage)
    assert files and files[0].endswith("train_sft.yaml")
    text = train_tab.read_recipe(files[0])
    with pytest.warns(UserWarning, match="model_name_or_path 'models/tiny-demo': model 'models/tiny-demo' not found"):
        train_tab.validate(ctx, stage, text)  # the demo recipe names a model this workspace lacks
    model_folder(ctx, "tiny-demo")
    with pytest.warns(UserWarning, match=r"no dataset named 'demo' \(datasets: shapes\)"):
        train_tab.validate(ctx, stage, text)
    text = text.replace("dataset: demo", "dataset: shapes")
    assert train_tab.validate(ctx, stage, text) == (
        "✅ valid train recipe · writes `models/tiny-demo-sft` · starts from scratch")
    with pytest.warns(UserWarning, match="unknown key.*lerning_rate"):
        verdict = train_tab.validate(ctx, stage, text + "\nlerning_rate: 0.1\n")
    assert verdict.startswith("train recipe: unknown key(s) lerning_rate")  # no temporary file's path
    with pytest.warns(UserWarning, match="not valid YAML"):
        verdict = train_tab.validate(ctx, stage, "stage: sft\nmodel_name_or_path: [models/x\n")
    assert verdict.startswith("train recipe is not valid YAML at line 3, column 1")
    running = ctx.store.create_job("train", {"output_dir": "models/tiny-demo-sft"}, name="sft")
    ctx.store.update_job(running, status="running", pid=os.getpid(), started_at=jobs_now())
    with pytest.warns(UserWarning, match=f"job {running} \\(train 'sft', running\\) is already writing"):
        train_tab.validate(ctx, stage, text)
    assert not (ctx.root / "runs" / "app-configs").exists()  # checks leave no files


def jobs_now() -> str:
    from visrl.store import now

    return now()


def test_model_choices_and_generate_config(ctx: Any) -> None:
    import json

    from visrl import jobs
    from visrl_app import generate_tab
    from visrl_app.context import model_choices, resolve_model

    (ctx.root / "models" / "base").mkdir()
    (ctx.root / "models" / "base" / "config.json").write_text("{}")
    (ctx.root / "models" / "lora").mkdir()
    (ctx.root / "models" / "lora" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "models/base"}))
    (ctx.root / "models" / "empty").mkdir()
    assert model_choices(ctx) == [("models/base (model)", "models/base"), ("models/lora (adapter)", "models/lora")]
    assert resolve_model(ctx, "models/lora") == ("models/base", "models/lora")
    config = generate_tab.compose_config(ctx, "models/lora", "shapes", "train", 5, 2, 0.7, "exact",
                                         "iou", "", "")
    assert (config["model_name_or_path"], config["adapter_name_or_path"]) == ("models/base", "models/lora")
    assert (config["limit"], config["attempts"], config["temperature"]) == (5, 2, 0.7)
    path = ctx.root / "gen.yaml"
    path.write_text(__import__("yaml").safe_dump(config))
    assert jobs.validate_config("generate", path)["answer_judge"] == "exact"  # GenerateConfig accepts it


def test_job_view_progress_metrics_and_history(ctx: Any) -> None:
    from visrl_app import job_panel

    job_id = ctx.store.create_job("train", {"stage": "sft"}, name="sft")
    ctx.store.update_job(job_id, status="succeeded", step=30, total=60, progress=0.5, eta_s=75.0)
    ctx.store.add_metrics(job_id, 5, {"loss": 2.0, "learning_rate": 1e-3})
    ctx.store.add_metrics(job_id, 10, {"loss": 1.5})
    status, bar, log, history, frame = job_panel.job_view(ctx, ("train",), job_id)
    assert "**succeeded**" in status and "value='1.0000'" in bar  # a finished job shows a full bar
    ctx.store.update_job(job_id, status="queued")
    _, bar, _, _, _ = job_panel.job_view(ctx, ("train",), job_id)
    assert "step 30/60 · 50% · ETA 1m15s" in bar
    assert frame.to_dict("records") == [{"step": 5, "value": 2.0, "name": "loss"},
                                        {"step": 10, "value": 1.5, "name": "loss"}]
    assert [row[0] for row in history] == [job_id] and log == ""
    ctx.store.update_job(job_id, status="running", pid=os.getpid(), progress=0.013)
    [row] = job_panel.job_view(ctx, ("train",), job_id)[3]
    assert row[job_panel.HISTORY_COLUMNS.index("progress")] == "1%"  # percent, as the bar says
    assert job_panel.latest_job(ctx, ("train",)) == job_id
    assert job_panel.latest_job(ctx, ("eval",)) is None


def test_evaluation_table_and_comparison(ctx: Any) -> None:
    from visrl_app import evaluate_tab

    ctx.store.add_evaluation({"n": 10, "answer_acc": 0.5, "acc50": 0.25, "mean_iou": 0.3, "seconds": 4.0,
                              "note": "x"}, "models/a", None, "shapes", "test", 10)
    ctx.store.add_evaluation({"n": 10, "answer_acc": 0.75, "acc50": 0.25, "seconds": 2.5},
                             "models/a", "models/a-sft", "shapes", "test", 10)
    table = evaluate_tab.evaluation_table(ctx)
    # n once, the useful metrics first, readable headers
    assert list(table.columns) == ["id", "model", "data", "n", "Acc@0.5", "answer acc", "mean IoU", "created"]
    assert table["answer acc"].tolist() == ["0.500 ±0.26", "0.750 ±0.31"] and table["model"].tolist()[1] == "models/a + models/a-sft"
    table_out, metric, baseline, plot, note = evaluate_tab.refresh(ctx, None, None)
    assert (metric.value, baseline.value) == ("acc50", 1)  # Acc@0.5 first; the oldest is the baseline
    assert [value for _, value in metric.choices] == ["acc50", "answer_acc", "mean_iou", "seconds"]  # n: a column
    assert "<span style='left:0.00%'>0</span>" in plot.value  # the axis starts at 0 and ends at 1
    assert "<span style='left:100.00%'>1</span>" in plot.value
    frame = evaluate_tab.comparison_frame(ctx, "answer_acc", baseline=1)
    # +0.25 on 10 items: the 95% intervals [0.24, 0.76] and [0.44, 0.92] overlap, so it is noise
    assert frame[["evaluation", "value", "n", "vs baseline", "items"]].to_dict("records") == [
        {"evaluation": "#1 models/a", "value": 0.5, "n": 10, "vs baseline": "baseline", "items": "baseline"},
        {"evaluation": "#2 models/a-sft", "value": 0.75, "n": 10, "vs baseline": "within noise",
         "items": "same items"}]
    assert frame["low"].round(3).tolist() == [0.237, 0.442]
    note_1 = evaluate_tab.comparison_note(ctx, "answer_acc", 1)
    assert "#2 models/a-sft: 0.750 [0.442, 0.919], n=10 (**+0.250**, within noise)" in note_1
    assert evaluate_tab.comparison_note(ctx, "answer_acc", 2).endswith(
        "#1 models/a: 0.500 [0.237, 0.763], n=10 (**-0.250**, within noise)")
    seconds = evaluate_tab.comparison_frame(ctx, "seconds", 1)["vs baseline"].tolist()
    assert seconds == ["baseline", "not compared"]  # no interval: no verdict (and faster is not "lower")
    assert evaluate_tab.comparison_frame(ctx, "acc50", 1)["vs baseline"].tolist() == ["baseline", "within noise"]


def test_evaluation_table_shows_unscored_answers_only_when_there_are_some(ctx: Any) -> None:
    """visrl.evaluate's unscored counts (model-judge replies without a score) are a table column
    when an evaluation has one, never a metric to compare in the plot."""
    from visrl_app import evaluate_tab

    ctx.store.add_evaluation({"n": 10, "answer_acc": 0.5, "unscored": 0, "direct_answer_acc": 0.4,
                              "direct_unscored": 0}, "models/a", None, "shapes", "test", 10)
    assert "unscored" not in " ".join(evaluate_tab.evaluation_table(ctx).columns)
    ctx.store.add_evaluation({"n": 10, "answer_acc": 0.75, "unscored": 2, "direct_answer_acc": 0.5,
                              "direct_unscored": 0}, "models/a", "models/a-sft", "shapes", "test", 10)
    table = evaluate_tab.evaluation_table(ctx)
    assert list(table.columns) == ["id", "model", "data", "n", "answer acc", "direct acc", "unscored", "created"]
    assert table["unscored"].tolist() == [0, 2]
    _, metric, *_ = evaluate_tab.refresh(ctx, None, None)
    assert [value for _, value in metric.choices] == ["answer_acc", "direct_answer_acc"]


def test_evaluation_spreads_fold_into_cells_and_long_names_stay_readable(ctx: Any) -> None:
    from visrl_app import evaluate_tab

    # The demo seeds rows like these: a benchmark arm over seeds (METRIC_std) with a long name.
    ctx.store.add_evaluation({"acc50": 0.26, "acc50_std": 0.03, "answer_acc": 0.47, "answer_acc_std": 0.0,
                              "true_crop_answer_acc": 1.0, "pairs": 135.0}, "learning benchmark (3 seeds): warm-up + VisRL "
                             "(model crop judge)", None, "demo", "test", 200)
    ctx.store.add_evaluation({"acc50": 0.2}, "/very/long/path/to/models/qwen25vl-7b-rl-stage2/checkpoint-60",
                             None, "demo", "test", 200)
    table = evaluate_tab.evaluation_table(ctx)
    assert list(table.columns) == ["id", "model", "data", "n", "Acc@0.5", "answer acc", "true-crop acc",
                                   "created"]  # no acc50_std or pairs column; a readable name for the rest
    # value ± 95% interval's wider side; the 3 seeds' spread widens the first (visrl.uncertainty)
    assert table["Acc@0.5"].tolist() == ["0.260 ±0.09", "0.200 ±0.06"]
    assert table["answer acc"].tolist()[0] == "0.470 ±0.07"  # a zero spread: Wilson alone
    assert evaluate_tab.comparison_frame(ctx, "acc50", 1)["spread"].tolist() == ["sd 0.030", ""]
    assert "acc50_std" not in evaluate_tab.metric_names(ctx.store.evaluations())  # not a score to compare
    labels = [evaluate_tab.evaluation_label(e) for e in ctx.store.evaluations()]
    assert labels == ["#1 warm-up + VisRL (model crop judge)", "#2 …models/qwen25vl-7b-rl-stage2/checkpoint-60"]


def test_noise_is_not_called_better_and_other_items_are_marked(ctx: Any) -> None:
    """Issue 19: a 40-item eval at +0.020 against the 200-item card was green "better", and so was
    a +0.005 benchmark arm. Both are within noise; the 40 items are other items than the card's."""
    from visrl_app import evaluate_tab

    ctx.store.add_evaluation({"acc50": 0.255, "answer_acc": 0.51}, "models/tiny-demo", None, "demo",
                             "test (model card)", 200)
    ctx.store.add_evaluation({"acc50": 0.26, "acc50_std": 0.0, "seeds": 1}, "learning benchmark (1 seed): "
                             "SFT warm-up", None, "demo", "test (model card)", 200)
    ctx.store.add_evaluation({"n": 40, "n_box": 40, "acc50": 0.275, "answer_acc": 0.5}, "models/tiny-demo",
                             "runs/3/adapter", "demo", "test", 40)
    frame = evaluate_tab.comparison_frame(ctx, "acc50", baseline=1)
    assert frame[["n", "vs baseline", "items"]].values.tolist() == [
        [200, "baseline", "baseline"], [200, "within noise", "same items"], [40, "within noise", "other items"]]
    chart = evaluate_tab.comparison_plot(ctx, "acc50", 1).value
    assert "0.275 [0.161, 0.428] · n=40" in chart and "within noise · other items" in chart
    assert "0.260 [0.204, 0.325] · n=200" in chart and ">better<" not in chart.split("visrl-ec-legend")[0]
    note = evaluate_tab.comparison_note(ctx, "acc50", 1)
    assert "(**+0.020**, within noise; other items: demo/test, n=40)" in note
    assert "(**+0.005**, within noise)" in note
    assert "seeds" not in evaluate_tab.metric_names(ctx.store.evaluations())  # a count, not a score


def test_chat_picker_offers_test_images_first(ctx: Any) -> None:
    from visrl_app import chat_tab

    item = ctx.store.items()[0]
    ds = ctx.store.dataset("shapes")["id"]
    keep = {k: item[k] for k in ("image", "width", "height", "answer")}
    ctx.store.add_items(ds, [{**keep, "split": "test", "source_id": "t0", "question": "Held out?"}])
    choices = chat_tab.item_choices(ctx)
    assert [label.split(" ", 2)[1] for label, _ in choices] == ["[test]"] + ["[train]"] * 4
    assert choices[0][0].endswith("Held out?") and len(chat_tab.item_choices(ctx, limit=2)) == 2


def test_chat_streams_box_crop_and_answer(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl_app import chat_tab

    image = Image.new("RGB", (100, 80), (10, 10, 10))
    crop = image.crop((10, 10, 50, 40))
    monkeypatch.setattr(chat_tab, "reasoner_for", lambda ctx, choice: FakeReasoner(crop))
    monkeypatch.setattr(chat_tab, "make_sampling", lambda temperature, max_new_tokens: None)
    outs = list(chat_tab.ask(ctx, "models/x", image, "where?", 0.0, 32))
    focus, shown_crop, box_text, answer, status = outs[-1]
    assert (box_text, answer, status) == ("[0.1, 0.2, 0.5, 0.6]", "a dot", "done")
    assert shown_crop is crop and focus.getpixel((10, 25)) == chat_tab.render.ORANGE
    assert [o[3] for o in outs] == ["", "", "a d", "a dot", "a dot"]


def test_chat_names_items_and_shows_reference_and_annotated_box(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: Chat named items "#251" and showed neither the reference answer nor the annotated
    box. Items are named by their image's stem (the README's "test_3"), and a picked item's
    reference and annotated box (blue) show beside the model's box (orange), with their IoU."""
    from visrl_app import chat_tab

    assert chat_tab.item_name({"image": "images/demo/test_3-0123456789abcdef.png"}) == "test_3"
    choices = chat_tab.item_choices(ctx)
    assert choices[0][0] == "item0 [train] What colour is square 0?"
    image, question, reference, shown, picked = chat_tab.pick_item(ctx, choices[0][1])
    assert (question, reference, picked) == ("What colour is square 0?", "red", choices[0][1])
    # the annotated box (20, 60, 80, 120) is drawn in blue on the shown image, not on the input
    assert shown.getpixel((20, 90)) == chat_tab.render.BLUE and image.getpixel((20, 90)) != chat_tab.render.BLUE
    assert chat_tab.pick_item(ctx, None) == (None, "", "", None, None)
    monkeypatch.setattr(chat_tab, "reasoner_for", lambda ctx, choice: FakeReasoner(Image.new("RGB", (4, 4))))
    monkeypatch.setattr(chat_tab, "make_sampling", lambda temperature, max_new_tokens: None)
    focus, *_, status = list(chat_tab.ask(ctx, "models/x", image, question, 0.0, 32, picked))[-1]
    assert focus.getpixel((20, 90)) == chat_tab.render.BLUE and focus.getpixel((10, 25)) == chat_tab.render.ORANGE
    assert status == "done · IoU with the annotated box 0.00: misses the annotated box (IoU ≤ 0.5)"
    assert chat_tab.finished(Box(20, 60, 80, 120), Box(20, 60, 80, 120)).endswith("1.00: on the annotated box")


class FakeReasoner:
    """Streams what ``Reasoner.stream_two_step`` streams: the box step, then the answer growing."""

    def __init__(self, crop: Image.Image) -> None:
        self.crop = crop

    def stream_two_step(self, img: Image.Image, question: str, sampling: Any) -> Any:
        yield {"kind": "box", "box_text": "[0.1, 0.2, 0.5, 0.6]", "box": Box(10, 10, 50, 40), "crop": self.crop}
        yield {"kind": "answer", "answer": "a d"}
        yield {"kind": "answer", "answer": "a dot"}


def test_chat_upload_within_the_pixel_budget(ctx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.images import MAX_IMAGE_PIXELS
    from visrl_app import chat_tab

    def no_model(ctx: Any, choice: str) -> Any:
        raise AssertionError("a model was loaded for an image that is refused")

    monkeypatch.setattr(chat_tab, "reasoner_for", no_model)
    # A 5000x4000 PNG (20 M pixels, over the 16.8 M limit) is a few KB on disk; the upload reaches
    # ask() as a path, and the refusal comes from its header, before any pixel is decoded.
    path = tmp_path / "big.png"
    Image.new("L", (5000, 4000)).save(path)
    assert 5000 * 4000 > MAX_IMAGE_PIXELS
    with pytest.warns(UserWarning, match=r"the uploaded image: the image is 5000x4000 = 20,000,000 pixels"):
        outs = list(chat_tab.ask(ctx, "models/x", str(path), "where?", 0.0, 32))
    assert outs[-1][0] is None and outs[-1][-1].startswith("error: the uploaded image: the image is 5000x4000")
    small = tmp_path / "small.png"
    Image.new("RGBA", (100, 80)).save(small)
    monkeypatch.setattr(chat_tab, "reasoner_for", lambda ctx, choice: FakeReasoner(Image.new("RGB", (4, 4))))
    monkeypatch.setattr(chat_tab, "make_sampling", lambda temperature, max_new_tokens: None)
    focus = list(chat_tab.ask(ctx, "models/x", str(small), "where?", 0.0, 32))[-1][0]
    assert focus.mode == "RGB" and focus.size == (100, 80)


def test_chat_crops_with_the_checkpoints_contract(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real two-step policy (generation scripted): the chat shows the crop the contract cuts,
    margin included, as generation and evaluation cut it."""
    from conftest import ScriptedTwoStep

    from visrl.contract import TwoStepContract
    from visrl.reasoning import Sampling
    from visrl_app import chat_tab

    class Scripted(ScriptedTwoStep):
        contract = TwoStepContract(box_format="normalized", crop_margin=0.5)

        def reply(self, conversation: list, sampling: Any) -> list[str]:
            return ["[0.25, 0.25, 0.50, 0.50]" if self.is_box_step(conversation) else "a dot"]

    monkeypatch.setattr(chat_tab, "reasoner_for", lambda ctx, choice: Scripted())
    monkeypatch.setattr(chat_tab, "make_sampling", lambda temperature, max_new_tokens: Sampling())
    image = Image.new("RGB", (200, 100))
    *_, (focus, crop, box_text, answer, status) = chat_tab.ask(ctx, "models/x", image, "where?", 0.0, 32)
    # box 50..100 x 25..50; half its size added on each side: 25..125 x 12.5..62.5 -> 100x51 px
    assert (box_text, answer, status) == ("[0.25, 0.25, 0.50, 0.50]", "a dot", "done")
    assert crop.size == (100, 51)


def test_chat_needs_image_and_question(ctx: Any) -> None:
    from visrl_app import chat_tab

    with pytest.warns(UserWarning, match="upload or pick an image"):
        outs = list(chat_tab.ask(ctx, "models/x", None, "q", 0.0, 32))
    assert outs[-1][-1] == "need an image and a question"
    image, question, *_ = chat_tab.pick_item(ctx, 2)
    assert image.size == (320, 240) and question == "What colour is square 1?"


def test_export_curated_pairs(ctx: Any) -> None:
    from visrl_app import pairs_export

    label = "TRL DPO, stage 1 (box step)"
    with pytest.warns(UserWarning, match="nothing to export"):
        pairs_export.export_pairs(ctx, label, ["accepted"], "any")
    review.accept(ctx.store, 1, 1)
    review.accept(ctx.store, 3, 1)
    message = pairs_export.export_pairs(ctx, label, ["accepted"], "shapes")
    assert message.startswith("Exported **2** rows to `exports/trl-dpo-stage1-")
    assert len(list(ctx.workspace.exports_dir.iterdir())) == 1


def test_start_from_tab_writes_config_and_watches_the_job(ctx: Any) -> None:
    import time

    from visrl_app import job_panel, train_tab

    text = "stage: sft\nmodel_name_or_path: models/base\noutput_dir: models/out\ndataset: shapes\nmax_steps: 2\n"
    with pytest.warns(UserWarning, match="model_name_or_path 'models/base': model 'models/base' not found"):
        assert train_tab.start_training(ctx, None, "sft", text)[0] is None
    assert ctx.store.jobs() == []  # refused before a row or a process
    model_folder(ctx, "base")
    text = text.replace("dataset: shapes", "dataset: shapes\nsplit: holdout")  # passes checks, fails in the child
    job_id, asked, _ = train_tab.start_training(ctx, None, "sft", text)
    assert isinstance(job_id, int) and not asked.visible
    job = ctx.store.job(job_id)
    assert Path(job["config_path"]).read_text() == text
    assert Path(job["config_path"]).parent == ctx.root / "runs" / "app-configs"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and ctx.store.job(job_id)["status"] in ("queued", "running"):
        time.sleep(0.3)
        job_panel.job_view(ctx, ("train",), job_id)  # polls refresh_jobs like the timer does
    status, bar, log, history, _ = job_panel.job_view(ctx, ("train",), job_id)
    assert "**failed**" in status and "data-status='failed'" in bar
    assert "no items with a ground-truth box in split 'holdout'" in status
    assert "-m visrl train" in log.splitlines()[0]  # the log starts with the command it ran
    assert history[0][:4] == [job_id, "train", "sft", "failed"]
    with pytest.warns(UserWarning, match="unknown key"):
        assert train_tab.start_training(ctx, job_id, "sft", text + "bogus: 1\n")[0] == job_id
    from visrl import jobs

    while jobs.process_state(job["pid"], job["started_at"])[0] and time.monotonic() < deadline:
        time.sleep(0.1)  # let the child exit (reaped), not leak into the next test


def test_generate_and_eval_forms_start_jobs_or_warn(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl_app import evaluate_tab, generate_tab, job_panel

    started: list[tuple[str, dict]] = []

    def fake_start(ctx: Any, kind: str, config: dict, name: str = "") -> int:
        started.append((kind, config))
        return 40 + len(started)

    monkeypatch.setattr(job_panel, "start", fake_start)
    with pytest.warns(UserWarning, match="pick a model or checkpoint and a dataset"):
        assert evaluate_tab.start_eval(ctx, 7, None, "shapes", "test", 5, True) == 7  # the shown job stays
    with pytest.warns(UserWarning, match="pick a model or checkpoint to generate with"):
        assert generate_tab.start_generation(ctx, None, "", "shapes", "train", 0, 3, 1.0, "exact", "iou", "", "") is None
    assert started == []
    assert evaluate_tab.start_eval(ctx, 7, "models/x", "shapes", "test", 5, True) == 41
    kind, config = started[0]
    assert kind == "eval" and (config["model_name_or_path"], config["dataset"], config["limit"]) == ("models/x", "shapes", 5)


# ---------------------------------------------------------------------- what the running app serves

@pytest.fixture
def served(ctx: Any) -> Any:
    """The app launched on ``ctx``'s workspace on a free loopback port: (ctx, base url)."""
    import socket

    from visrl_app.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks = launch(ctx.workspace, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield ctx, f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


def http_get(url: str, host: str | None = None) -> int:
    """The status of a GET of ``url`` (with ``host`` as the Host header when given)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_file_route_serves_images_never_store_weights_logs_or_configs(served: Any) -> None:
    ctx, url = served
    root = ctx.root
    review.accept(ctx.store, 1, 1)  # a write: the WAL exists
    (root / "models" / "tiny").mkdir()
    (root / "models" / "tiny" / "model.safetensors").write_bytes(b"\0" * 64)
    (root / "runs" / "1").mkdir(parents=True)
    (root / "runs" / "1" / "log.txt").write_text("step 1 loss 2.0\n")
    (root / "configs").mkdir(exist_ok=True)
    (root / "configs" / "train_sft.yaml").write_text("stage: sft\n")
    (root / "images" / "store.png").symlink_to(root / "visrl.db")  # a link does not get around it
    assert (root / "visrl.db-wal").is_file()
    base = url + "gradio_api/file="
    assert http_get(base + str(root / "images" / "item0.png")) == 200
    refused = ["visrl.db", "visrl.db-wal", "visrl.db-shm", "models/tiny/model.safetensors",
               "runs/1/log.txt", "configs/train_sft.yaml", "images/store.png", "images/../visrl.db"]
    assert {name: http_get(base + str(root / name)) for name in refused} == dict.fromkeys(refused, 403)
    assert http_get(url + "gradio_api/file/" + str(root / "visrl.db")) == 403  # the older route too


@pytest.mark.parametrize(("host", "status"), [
    (None, 200), ("localhost", 200), ("127.0.0.1", 200), ("[::1]", 200), ("LOCALHOST", 200),
    ("evil.example", 403), ("localhost.evil.example", 403), ("127.0.0.1.nip.io", 403), ("", 403),
])
def test_local_app_answers_only_loopback_hosts(served: Any, host: str | None, status: int) -> None:
    _, url = served
    port = int(url.rsplit(":", 1)[1].strip("/"))
    header = None if host is None else (f"{host}:{port}" if host else "")
    if host == "":
        header = " "  # an empty Host header
    assert http_get(url + "config", host=header) == status


def test_no_decision_lost_after_a_file_fetch_and_another_process(served: Any) -> None:
    """The sequence that lost decisions: the app is asked for visrl.db, another process (a CLI,
    a job, Datasette) opens and closes the store, then the curator accepts pairs."""
    import subprocess

    from visrl_app import pairs_tab

    ctx, url = served
    state = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state(), *NO_EDITS, *FILTERS))["state"]  # connection open
    assert http_get(url + "gradio_api/file=" + str(ctx.workspace.db_path)) == 403
    count = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
             "print(c.execute(\"SELECT count(*) FROM pairs WHERE status = 'accepted'\").fetchone()[0]); c.close()")
    other = subprocess.run([sys.executable, "-c", count, str(ctx.workspace.db_path)],
                           capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "0"
    for _ in range(4):
        state = view_dict(pairs_tab.act(ctx, "accept", state, *NO_EDITS, *FILTERS))["state"]
    assert review.status_counts(ctx.store)["accepted"] == 4
    fresh = subprocess.run([sys.executable, "-c", count, str(ctx.workspace.db_path)],
                           capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "4"  # every confirmed decision is in the file


# ---------------------------------------------------------------------- job controls and curves

def test_controls_follow_the_watched_job(ctx: Any) -> None:
    from visrl_app import job_panel

    job = ctx.store.create_job("train", {}, name="sft")
    ctx.store.update_job(job, status="running", pid=os.getpid(), started_at=jobs_now())

    def buttons() -> tuple[Any, ...]:
        return job_panel.panel_view(ctx, ("train",), job)[-3:]

    start, stop, kill = buttons()
    assert (start.interactive, stop.interactive, stop.value, kill.visible) == (False, True, "Stop job", True)
    ctx.store.update_job(job, status="stopping")
    start, stop, kill = buttons()
    assert (start.interactive, stop.interactive, stop.value, kill.visible) == (False, False, "Stopping…", True)
    message = job_panel.stop(ctx, job)  # a second click while stopping: no signal, says so
    assert message.startswith(f"job {job} is already stopping") and ctx.store.job(job)["status"] == "stopping"
    ctx.store.update_job(job, status="stopped")
    start, stop, kill = buttons()
    assert (start.interactive, stop.interactive, kill.visible) == (True, False, False)
    start, stop, kill = job_panel.panel_view(ctx, ("train",), None)[-3:]
    assert (start.interactive, stop.interactive) == (True, False)  # nothing watched: free to start


def test_kill_needs_a_confirmation_about_one_job(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl import jobs
    from visrl_app import job_panel

    killed: list[int] = []
    monkeypatch.setattr(jobs, "kill_job", lambda ws, job_id: killed.append(job_id) or {"status": "stopped"})
    job = ctx.store.create_job("train", {}, name="sft")
    ctx.store.update_job(job, status="running", pid=os.getpid(), started_at=jobs_now())
    row, pending, question = job_panel.ask_kill(ctx, job)
    assert row.visible and pending == job and f"Kill job {job} (train) now?" in question
    assert killed == []  # asking kills nothing
    row, pending, message = job_panel.kill(ctx, pending)
    assert killed == [job] and not row.visible and pending is None and "killed" in message
    ctx.store.update_job(job, status="stopped")
    with pytest.warns(UserWarning, match="no running job to kill"):
        row, pending, _ = job_panel.ask_kill(ctx, job)
    assert not row.visible and pending is None


def test_loss_curve_spans_a_resumed_job_and_overlays_runs(ctx: Any) -> None:
    from visrl_app import curves

    config = {"output_dir": "models/out", "logging_steps": 5}
    first = ctx.store.create_job("train", config, name="sft")
    for step in (5, 10, 15, 20):
        ctx.store.add_metrics(first, step, {"loss": 2.0 - step / 20})
    ctx.store.update_job(first, step=20)  # rows from before start_step: the resume is guessed
    other = ctx.store.create_job("train", {"output_dir": "models/other", "logging_steps": 5}, name="dpo")
    ctx.store.add_metrics(other, 5, {"loss": 0.7})
    ctx.store.add_metrics(other, 5, {"train_loss": 0.7})  # the Trainer's end-of-run mean: no curve point
    resumed = ctx.store.create_job("train", config, name="sft")  # resumed from checkpoint-15
    for step in (20, 25):
        ctx.store.add_metrics(resumed, step, {"loss": 1.0 - step / 100})
    frame = curves.loss_frame(ctx, resumed)
    assert frame["step"].tolist() == [5, 10, 15, 20, 25]  # one curve; step 20 from the resumed job
    assert frame["value"].tolist() == [1.75, 1.5, 1.25, 0.8, 0.75] and set(frame["name"]) == {"loss"}
    fresh = ctx.store.create_job("train", config, name="sft")  # from scratch into the same folder
    ctx.store.add_metrics(fresh, 5, {"loss": 3.0})
    assert curves.loss_frame(ctx, fresh)["step"].tolist() == [5]
    both = curves.loss_frame(ctx, fresh, overlay=[other])
    assert both.to_dict("records") == [{"step": 5, "value": 3.0, "name": f"#{fresh} loss"},
                                       {"step": 5, "value": 0.7, "name": f"#{other} loss"}]
    assert [value for _, value in curves.overlay_choices(ctx)] == [fresh, resumed, other, first]


def test_loss_frame_is_numeric_even_before_the_first_point(ctx: Any) -> None:
    """The browser builds the chart's spec from the first frame it gets (an empty one on a page
    opened before the job logs): object columns made the axes text and the line invisible."""
    import gradio as gr

    from visrl_app import curves

    job = ctx.store.create_job("train", {"output_dir": "models/out", "logging_steps": 1}, name="sft")
    for chart in (curves.loss_frame(ctx, None), curves.loss_frame(ctx, job)):  # nothing logged yet
        assert chart.empty and {c: str(t) for c, t in chart.dtypes.items()} == {
            "step": "int64", "value": "float64", "name": "str"}
        sent = gr.LinePlot(x="step", y="value", color="name").postprocess(chart)
        assert sent.datatypes == {"step": "quantitative", "value": "quantitative", "name": "nominal"}
    ctx.store.add_metrics(job, 1, {"loss": 0.1227363348, "learning_rate": 1e-3})
    ctx.store.add_metrics(job, 2, {"loss": 0.9717247009, "eval_loss": 1.5})
    chart = curves.loss_frame(ctx, job)
    assert chart.to_dict("records") == [{"step": 1, "value": 0.1227363348, "name": "loss"},
                                        {"step": 2, "value": 0.9717247009, "name": "loss"},
                                        {"step": 2, "value": 1.5, "name": "eval_loss"}]
    assert {c: str(t) for c, t in chart.dtypes.items()} == {"step": "int64", "value": "float64", "name": "str"}
    # The colours follow the series the browser shows (its value, as it sends it back).
    shown = gr.LinePlot(x="step", y="value", color="name").postprocess(chart).model_dump()
    assert curves.recolor(shown).color_map == {"loss": curves.PALETTE[0], "eval_loss": curves.PALETTE[1]}
    assert curves.recolor(None).color_map == {}


def test_a_resumed_job_that_logged_nothing_shows_the_run_it_continues(ctx: Any) -> None:
    """An 8-step run (logging every 5) stopped at step 6 and resumed: the resumed part logs no
    loss point before its end (only the Trainer's summary), and the chart showed nothing."""
    from visrl_app import curves

    config = {"output_dir": "models/out", "logging_steps": 5, "max_steps": 8}
    first = ctx.store.create_job("train", config, name="sft")
    ctx.store.add_metrics(first, 5, {"loss": 0.8})
    ctx.store.update_job(first, status="stopped", step=6, start_step=0)
    failed = ctx.store.create_job("train", config, name="sft")  # died while loading: reached no step
    ctx.store.update_job(failed, status="failed", step=0)
    resumed = ctx.store.create_job("train", config, name="sft")
    ctx.store.update_job(resumed, status="succeeded", step=8, start_step=6)
    ctx.store.add_metrics(resumed, 8, {"train_loss": 0.7})
    assert curves.loss_frame(ctx, resumed).to_dict("records") == [{"step": 5, "value": 0.8, "name": "loss"}]
    again = ctx.store.create_job("train", config, name="sft")  # resumed at 8 from the resumed one
    ctx.store.update_job(again, status="running", step=10, start_step=8)
    ctx.store.add_metrics(again, 10, {"loss": 0.5})
    assert curves.loss_frame(ctx, again)["step"].tolist() == [5, 10]
    fresh = ctx.store.create_job("train", config, name="sft")  # start_step 0: from scratch
    ctx.store.update_job(fresh, status="running", step=7, start_step=0)
    ctx.store.add_metrics(fresh, 7, {"loss": 3.0})
    assert curves.loss_frame(ctx, fresh)["step"].tolist() == [7]


def finished_run(ctx: Any, output: str = "models/sft", step: int = 60) -> str:
    """A recipe whose output folder holds a finished run (checkpoint-60 of max_steps 60)."""
    import json

    model_folder(ctx, "base")
    folder = ctx.root / output / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": step}))
    return (f"stage: sft\nmodel_name_or_path: models/base\noutput_dir: {output}  # the run's folder\n"
            f"dataset: shapes\nmax_steps: {step}\n")


def test_start_asks_before_re_running_a_finished_recipe(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to start, "succeed" in ~10 s at step 61/60 and train nothing, without a word."""
    from visrl import jobs
    from visrl_app import train_tab

    started: list[str] = []
    monkeypatch.setattr(jobs, "start_job", lambda ws, kind, path, name="": started.append(
        Path(path).read_text()) or len(started))
    text = finished_run(ctx)
    with pytest.warns(UserWarning, match="already holds a finished run"):
        assert "finished run" in train_tab.validate(ctx, "sft", text)
    job, row, question = train_tab.start_training(ctx, None, "sft", text)
    assert (job, row.visible, started) == (None, True, [])
    assert "already holds a finished run" in question and "`models/sft-2`" in question
    assert "up to step 120" in question
    job, row, shown = train_tab.start_changed(ctx, "fresh", None, "sft", text)
    assert (job, row.visible) == (1, False) and started == [shown]
    assert "output_dir: models/sft-2\n" in shown and "max_steps: 60" in shown  # the editor shows what runs
    job, row, shown = train_tab.start_changed(ctx, "continue", None, "sft", text)
    assert job == 2 and "output_dir: models/sft  #" in shown and "max_steps: 120\n" in shown
    assert train_tab.validate(ctx, "sft", shown).endswith("resumes from checkpoint-60 at step 60 of 120")


def test_the_editor_shows_the_config_of_the_job_the_panel_shows(ctx: Any) -> None:
    """After a reload the editor showed the stage's recipe file while the panel showed (and
    offered to resume) a job started with another config."""
    import json

    from visrl_app import train_tab

    recipe = ctx.root / "runs" / "app-configs" / "train-1.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("stage: dpo\noutput_dir: models/mine  # edited in the app\n")
    job = ctx.store.create_job("train", {"stage": "dpo", "output_dir": "models/mine"},
                               config_path=str(recipe), name="dpo")
    ctx.store.update_job(job, status="stopped")
    loaded = train_tab.load(ctx)
    assert loaded[0] == job
    stage, dropdown, text = loaded[-3:]
    assert (stage.value, dropdown.value, text) == (
        "dpo (VisRL stage 1: box step)", str(recipe), recipe.read_text())
    recipe.unlink()  # gone: the config the job recorded
    merge = ctx.store.create_job("merge", {"export_dir": "models/m"}, config_path=str(recipe), name="merge")
    stage, dropdown, text = train_tab.job_recipe(ctx, merge)
    assert stage.value == "merge LoRA" and json.loads(json.dumps(__import__("yaml").safe_load(text))) == {
        "export_dir": "models/m"}
    assert all(isinstance(part, type(train_tab.gr.skip())) for part in train_tab.job_recipe(ctx, None))


def test_generate_form_says_nothing_to_do_and_defaults_to_new_items(ctx: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl_app import generate_tab, job_panel

    model_folder(ctx, "base")
    form = ["models/base", "shapes", "train", 2, 1, 1.0, "exact", "iou", "", ""]
    assert generate_tab.readiness(ctx, *form).startswith("Ready: 2 of 2 items to generate in run shapes-train-")
    run_key = generate_tab.run_plan(ctx, generate_tab.compose_config(ctx, *form)).run_key
    for item in ctx.store.items("shapes", "train", limit=2):  # an earlier identical run did these
        for kind in ("policy", "negative"):
            ctx.store.add_rollout({"item_id": item["id"], "attempt": 0, "kind": kind, "run_key": run_key,
                                   "box": None, "answer": "red"})
    assert generate_tab.readiness(ctx, *form).startswith("⚠️ nothing to do: all 2 items already have every attempt")
    started: list[Any] = []
    monkeypatch.setattr(job_panel, "start", lambda *args, **kw: started.append(args) or 9)
    with pytest.warns(UserWarning, match="nothing to do"):
        assert generate_tab.start_generation(ctx, None, *form) is None
    assert started == []
    assert generate_tab.useful_limit(ctx, *form) == 4  # the next items of the split (4 in all)
    form[3] = 4
    assert generate_tab.readiness(ctx, *form).startswith("Ready: 2 of 4 items to generate")
    assert generate_tab.start_generation(ctx, None, *form) == 9 and len(started) == 1


def test_generate_form_takes_the_judge_key_variable_and_warns_when_unset(
        ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The form exposes model judges, so it takes judge_api_key_env (a variable's name); an unset
    variable, or a judge server that is not there, is a warning under the form and at start,
    before any job row."""
    from test_judges import FakeJudgeServer

    from visrl_app import generate_tab

    model_folder(ctx, "base")
    monkeypatch.delenv("VISRL_T_JUDGE_KEY", raising=False)
    form = ["models/base", "shapes", "train", 2, 1, 1.0, "model", "iou", "http://127.0.0.1:9/v1", "judge",
            " VISRL_T_JUDGE_KEY "]
    assert generate_tab.compose_config(ctx, *form)["judge_api_key_env"] == "VISRL_T_JUDGE_KEY"
    unset = "judge_api_key_env names the environment variable VISRL_T_JUDGE_KEY, which is not set or empty"
    assert generate_tab.readiness(ctx, *form).startswith(f"⚠️ {unset}")
    with pytest.warns(UserWarning, match=unset):
        assert generate_tab.start_generation(ctx, None, *form) is None
    assert ctx.store.jobs() == []
    monkeypatch.setenv("VISRL_T_JUDGE_KEY", "s3cret")
    assert generate_tab.readiness(ctx, *form).startswith(
        "⚠️ judge_base_url http://127.0.0.1:9/v1: connection refused")  # nothing listens on port 9
    with FakeJudgeServer([], models=("judge",), api_key="s3cret") as server:
        form[8] = server.base_url
        assert generate_tab.readiness(ctx, *form).startswith("Ready: 2 of 2 items")
    # a rule judge reads no key: the field is not written
    assert "judge_api_key_env" not in generate_tab.compose_config(ctx, *form[:6], "exact", "iou", "", "", "X")


def test_every_page_load_handler_runs_through_gradio(ctx: Any) -> None:
    """Each tab's load, run the way gradio runs it on a page load (process_api: preprocess, call,
    postprocess), with the form's defaults; a load that raises leaves 'Error' in every output."""
    import asyncio

    from gradio.state_holder import SessionState

    from visrl_app.app import build_app

    model_folder(ctx, "base")
    blocks = build_app(ctx.workspace)
    loads = [fn for fn in blocks.fns.values() if any(target[1] == "load" for target in fn.targets)]
    assert len(loads) == 5  # Pairs, Generate, Train, Evaluate, Chat
    for fn in loads:
        out = asyncio.run(blocks.process_api(fn, [block.value for block in fn.inputs], state=SessionState(blocks)))
        assert len(out["data"]) == len(fn.outputs)
def test_inputs_of_an_older_view_are_not_saved(ctx: Any) -> None:
    """A click made while the previous request ran carries the previous pair's inputs: the
    action happens, those inputs are not stored onto the pair now on screen."""
    import functools

    from visrl_app import pairs_tab

    view = view_dict(pairs_tab.show_first(ctx, pairs_tab.empty_state("ana"), *NO_EDITS, *FILTERS))
    accept = pairs_tab.current_view(functools.partial(pairs_tab.act, ctx, "accept"))
    stale = view_dict(accept(view["state"], "0", None, "typed on another pair", None, *FILTERS))
    assert [r["action"] for r in review.reviews(ctx.store, 1)] == ["accept"]
    assert review.get_pair(ctx.store, 1)["chosen_answer"] == "red"
    n = stale["state"]["n"]
    accept(stale["state"], str(n), None, "crimson", None, *FILTERS)  # the view on screen: saved
    assert [r["action"] for r in review.reviews(ctx.store, 2)] == ["edit_chosen_answer", "accept"]


def test_app_user_names_the_reviewer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl_app.context import AppContext
    from visrl_app.main import main

    ws = seed_pairs(tmp_path / "ws", n=1)
    assert AppContext.open(ws, user="ana").user == "ana"
    monkeypatch.setenv("VISRL_USER", "bo")
    assert AppContext.open(ws).user == "bo"
    with pytest.raises(SystemExit) as exit_info:
        main(["--workspace", str(ws.root), "--user", " ", "--port", "1"])
    assert exit_info.value.code == 2
