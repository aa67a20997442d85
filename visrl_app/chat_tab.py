"""The Chat tab: ask a checkpoint about an image; see its focus box, the crop, the streamed answer.

An image picked from the workspace's data also shows its reference answer and its annotated box
(blue) beside the model's (orange), with their IoU: the user sees at once whether the model looked
at the right place. Items are named by their image's file stem ("test_3"), as the README does.
torch/transformers are imported on the first question only (the app starts without them). The
tab's components are a named set; handlers return views named after them (:mod:`visrl_app.components`).
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
from PIL import Image

from visrl.boxes import iou
from visrl.errors import VisRLError
from visrl.images import open_bounded
from visrl.store import box_from_json
from visrl_app import render
from visrl_app.components import Components, Tab
from visrl_app.context import AppContext, model_choices, model_dropdown, resolve_model, warn

# Loaded models, keyed by (model path, adapter path). This is the one process-global cache of the
# app, on purpose: a model takes seconds and hundreds of MB to load, every browser asking the same
# checkpoint should share it, and it holds no per-user state. Two entries bound the memory
# (e.g. the base model and one fine-tuned checkpoint side by side).
_MODEL_CACHE: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
_MODEL_CACHE_SIZE = 2
_MODEL_LOCK = threading.Lock()


class ChatView(NamedTuple):
    """What :func:`ask` streams: the image with the boxes, the crop, the box text, the answer so
    far, the status line."""

    focus: Any
    crop: Any
    box_text: str
    answer: str
    status: str


class PickedItem(NamedTuple):
    """:func:`pick_item`: the image, its question and reference answer, the image with its
    annotated box, and the item id."""

    image: Any
    question: str
    reference: str
    focus: Any
    picked: int | None


def failed(status: str, image: Any = None) -> ChatView:
    """A view that shows ``status`` (and ``image`` if any) with no box, crop or answer."""
    return ChatView(focus=image, crop=None, box_text="", answer="", status=status)


def cached_model(model_path: str, adapter: str | None) -> Any:
    """``visrl.models.load_model`` through a small LRU keyed by path."""
    key = (model_path, adapter)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            _MODEL_CACHE.move_to_end(key)
            return _MODEL_CACHE[key]
        from visrl.models import load_model  # lazy: imports torch + transformers

        loaded = load_model(model_path, adapter=adapter)
        _MODEL_CACHE[key] = loaded
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
        return loaded


def reasoner_for(ctx: AppContext, choice: str) -> Any:
    """A reasoner over the cached model with the checkpoint's own contract: the chat parses, crops
    and sizes images as the model was trained and as generation and evaluation do."""
    from visrl.policy import resolve_model_path
    from visrl.reasoning import Reasoner

    model_path, adapter = resolve_model(ctx, choice)
    # Workspace folders resolve inside it; a Hub id (a base recorded by training) stays an id.
    loaded = cached_model(resolve_model_path(ctx.workspace, model_path) or model_path,
                          resolve_model_path(ctx.workspace, adapter))
    return Reasoner(loaded)


def make_sampling(temperature: float, max_new_tokens: int) -> Any:
    from visrl.reasoning import Sampling

    return Sampling(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, n=1)


def _get(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, dict) else getattr(event, name, None)


def chat_outputs(image: Image.Image, box: Any, crop: Any, box_text: str, answer: str,
                 status: str, annotated: Any = None) -> ChatView:
    """The outputs, with the model's box (orange, labelled "model") and the item's annotated box
    (blue; unlabelled: a right box lies on it and both labels would overprint, the legend names
    the colours) drawn on the image when there are such boxes."""
    shown = image
    if annotated is not None:
        shown = render.draw_box(shown, annotated, render.BLUE)
    if box is not None:
        shown = render.draw_box(shown, box, render.ORANGE, "model")
    return ChatView(focus=shown, crop=crop, box_text=box_text, answer=answer, status=status)


def annotated_box(ctx: AppContext, item_id: int | None) -> Any:
    """The picked item's annotated box (original pixels), or None (an upload, or no box)."""
    if item_id is None:
        return None
    return box_from_json(ctx.store.item(int(item_id)).get("gt_box"))


def finished(box: Any, annotated: Any) -> str:
    """The last status line: done, and how the model's box meets the annotated one."""
    if box is None:
        return "done (no box parsed: answered on the full image)"
    if annotated is None:
        return "done"
    from visrl.evaluate import ACC_IOU  # lazy: the app starts without the evaluator's imports

    overlap = iou(box, annotated)
    hit = "on the annotated box" if overlap > ACC_IOU else f"misses the annotated box (IoU ≤ {ACC_IOU})"
    return f"done · IoU with the annotated box {overlap:.2f}: {hit}"


def ask(ctx: AppContext, choice: str, image: str | Image.Image | None, question: str,
        temperature: float, max_new_tokens: float, item_id: int | None = None) -> Iterator[ChatView]:
    """Stream a :class:`ChatView` (image with focus box, crop, box text, answer so far, status) at each step;
    ``item_id``: the workspace item the image is (its annotated box is drawn too)."""
    if image is None or not (question or "").strip():
        warn("upload or pick an image and type a question")
        yield failed("need an image and a question")
        return
    if not choice:
        warn("pick a model or checkpoint")
        yield failed("no model chosen", image)
        return
    try:  # an upload arrives as a file path, still undecoded: its size is checked from the header
        image = open_bounded(image, where="the uploaded image")
    except VisRLError as exc:
        warn(str(exc))
        yield failed(f"error: {exc}")
        return
    annotated = annotated_box(ctx, item_id)
    yield chat_outputs(image, None, None, "", "", f"loading {choice} ...", annotated)
    try:
        reasoner = reasoner_for(ctx, choice)
        sampling = make_sampling(float(temperature), int(max_new_tokens))
        box = crop = None
        box_text = answer = ""
        for event in reasoner.stream_two_step(image, question.strip(), sampling):
            box = _get(event, "box") or box
            crop = _get(event, "crop") or crop
            box_text = _get(event, "box_text") or box_text
            answer = _get(event, "answer") if _get(event, "answer") is not None else answer
            stage = _get(event, "kind") or _get(event, "type") or "working"
            yield chat_outputs(image, box, crop, box_text, answer, str(stage), annotated)
        yield chat_outputs(image, box, crop, box_text, answer, finished(box, annotated), annotated)
    except VisRLError as exc:
        warn(str(exc))
        yield failed(f"error: {exc}", image)


def item_name(item: dict[str, Any]) -> str:
    """The item's image file stem without the content hash the import adds
    (``images/demo/test_3-0123456789abcdef.png`` -> ``test_3``): the name the README uses."""
    stem = Path(item["image"]).stem
    return re.sub(r"-[0-9a-f]{16}$", "", stem) or stem


def item_choices(ctx: AppContext, limit: int = 300) -> list[tuple[str, int]]:
    """Up to ``limit`` items to try, the test split's first: images no training stage saw (the
    demo's 200 train items came first and filled the list the picker shows)."""
    test = ctx.store.items(split="test", limit=limit)
    rest = [i for i in ctx.store.items(limit=limit) if i["split"] != "test"][: limit - len(test)]
    return [(f"{item_name(i)} [{i['split']}] {i['question'][:70]}", i["id"]) for i in test + rest]


def pick_item(ctx: AppContext, item_id: int | None) -> PickedItem:
    """The image, question, reference answer, image with its annotated box and id of a picked item."""
    if item_id is None:
        return PickedItem(image=None, question="", reference="", focus=None, picked=None)
    item = ctx.store.item(int(item_id))
    image = Image.open(ctx.workspace.absolute(item["image"])).convert("RGB")
    annotated = box_from_json(item.get("gt_box"))
    shown = render.draw_box(image, annotated, render.BLUE) if annotated is not None else image
    return PickedItem(image=image, question=item["question"], reference=item.get("answer") or "", focus=shown,
                      picked=int(item_id))


def forget_item() -> tuple[None, str]:
    """An uploaded or cleared image is no workspace item: no reference, no annotated box."""
    return None, ""


# The boxes' colours (visrl_app.render), as the legend under the image names them.
LEGEND = ("<div id='chat-legend' style='font-size:13px'>Boxes: "
          f"<span style='color:rgb{render.ORANGE}'>■ model's focus</span> · "
          f"<span style='color:rgb{render.BLUE}'>■ annotated box (picked item)</span></div>"
          )


def create_chat_tab(ctx: AppContext) -> Tab:
    models = model_choices(ctx)
    with gr.Row():
        model = gr.Dropdown(models, value=models[-1][1] if models else None, label="Model / checkpoint",
                            scale=3, elem_id="chat-model", allow_custom_value=True)
        item = gr.Dropdown(item_choices(ctx), value=None, label="…or pick an image from the data",
                           scale=3, elem_id="chat-item")
    with gr.Row():
        # type="filepath" with image_mode=None: gradio hands over the file undecoded (open_bounded decodes it).
        image = gr.Image(type="filepath", image_mode=None, label="Image (upload)", elem_id="chat-image",
                         height=360, sources=["upload", "clipboard"], scale=2)
        with gr.Column(scale=3):
            focus = gr.Image(type="pil", label="Focus box", interactive=False, elem_id="chat-focus", height=360)
            gr.HTML(LEGEND)
        with gr.Column(scale=2):
            crop = gr.Image(type="pil", label="Focus crop (what the answer looked at)", interactive=False,
                            elem_id="chat-crop", height=240)
            box_text = gr.Textbox(label="Box (model's text)", elem_id="chat-box")
            answer = gr.Textbox(label="Answer", lines=3, elem_id="chat-answer")
            reference = gr.Textbox(label="Reference answer (picked item)", elem_id="chat-reference",
                                   interactive=False)
            status = gr.Markdown(elem_id="chat-status")
    with gr.Row():
        question = gr.Textbox(label="Question", scale=4, elem_id="chat-question")
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.1, label="Box temperature (0 = greedy)", scale=1)
        max_tokens = gr.Slider(8, 256, value=64, step=8, label="Max new tokens", scale=1)
    send = gr.Button("Ask", variant="primary", elem_id="chat-ask")
    picked = gr.State(None)  # the workspace item the image is, until the user uploads another
    components = Components(model=model, item=item, image=image, focus=focus, crop=crop, box_text=box_text,
                            answer=answer, reference=reference, status=status, question=question,
                            temperature=temperature, max_new_tokens=max_tokens, ask=send, picked=picked)
    item.change(functools.partial(pick_item, ctx), [item], components.outputs(PickedItem),
                api_visibility="undocumented")
    for event in (image.upload, image.clear):
        event(forget_item, None, [picked, reference], api_visibility="undocumented")
    # In the order of ask()'s parameters.
    inputs = components.pick("model", "image", "question", "temperature", "max_new_tokens", "picked")
    outputs = components.outputs(ChatView)
    send.click(functools.partial(ask, ctx), inputs, outputs, api_visibility="undocumented")
    question.submit(functools.partial(ask, ctx), inputs, outputs, api_visibility="undocumented")
    return Tab(components, functools.partial(model_dropdown, ctx), load_inputs=("model",), load_outputs=("model",))
