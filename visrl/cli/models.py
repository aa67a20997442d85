"""CLI commands: ``visrl models build-tiny|info``, ``visrl infer`` (two-step on one image) and
``visrl serve CONFIG`` (an OpenAI-compatible server over a local model)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from visrl.cli import cli, workspace_option


@cli.group()
def models() -> None:
    """Build the tiny offline model; describe a model folder."""


@models.command("build-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["test", "test-qwen3", "test-qwen2_5", "demo"]), default="test",
              show_default=True, help="test: ~1M-parameter Qwen2-VL for unit tests (test-qwen3, test-qwen2_5: "
              "the same size in those families); demo: the Qwen3-VL that learns the demo on a CPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def build_tiny(out: str, preset: str, seed: int) -> None:
    """Write a randomly initialised tiny VLM (with its own tokenizer and processor) to OUT."""
    from visrl.models import describe, load_model
    from visrl.tiny import build_tiny_model

    info = describe(load_model(build_tiny_model(out, preset=preset, seed=seed), device="cpu"))
    click.echo(f"built a tiny {info['family']} model ({info['parameters']:,} parameters, boxes as "
               f"{info['box_format']}) in {out}")


@models.command("info")
@click.argument("path", type=click.Path())
@click.option("--adapter", type=click.Path(), default=None, help="A LoRA adapter to load on top.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(path: str, adapter: str | None, as_json: bool) -> None:
    """Family, parameter count, box format and pixel budget of the model in PATH."""
    from visrl.models import describe, load_model

    described = describe(load_model(path, adapter=adapter, device="cpu"))
    if as_json:
        click.echo(json.dumps(described))
        return
    for key, value in described.items():
        shown = f"{value:,}" if key in ("parameters", "min_pixels", "max_pixels") and value else value
        click.echo(f"{key.replace('_', ' ')}: {shown}")


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="An infer YAML (configs/infer.yaml); the options below override it.")
@click.option("--model", "model_path", default=None, help="Model folder (absolute, or relative to the workspace).")
@click.option("--adapter", default=None, help="LoRA adapter folder (absolute, or relative to the workspace).")
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--question", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--crop-out", type=click.Path(dir_okay=False), default=None,
              help="Where to save the crop step 2 saw (default: IMAGE-STEM-crop.png in this folder).")
@click.option("--temperature", type=float, default=None, help="0 = greedy (the default).")
@click.option("--max-new-tokens", type=int, default=None, help="Per step (default 64).")
@click.option("--box-format", default=None, help="Box text format (default: the model's).")
@workspace_option
def infer(config_path: str | None, model_path: str | None, adapter: str | None, image_path: str, question: str,
          as_json: bool, crop_out: str | None, temperature: float | None, max_new_tokens: int | None,
          box_format: str | None, workspace: str | None) -> None:
    """Two-step inference on one image: print the box, save the crop, print the answer."""
    from visrl.config import from_dict, load_config
    from visrl.errors import ConfigError
    from visrl.infer import InferConfig, run_infer

    overrides = {k: v for k, v in {"model_name_or_path": model_path, "adapter_name_or_path": adapter,
                                   "temperature": temperature, "max_new_tokens": max_new_tokens,
                                   "box_format": box_format}.items() if v is not None}
    if config_path:
        cfg = load_config(InferConfig, config_path, overrides)
    elif model_path:
        cfg = from_dict(InferConfig, overrides, source="options")
    else:
        raise ConfigError("name the model: --model PATH (or --config with model_name_or_path)")
    crop_file = crop_out or f"{Path(image_path).stem}-crop.png"
    result = run_infer(cfg, image_path, question, crop_file, workspace)
    if as_json:
        click.echo(json.dumps(result))
        return
    width, height = result["image_size"]
    click.echo(f"box: {result['box']} (pixels of the {width}x{height} image; the model wrote "
               f"{result['box_text']!r})" if result["box"] else
               f"box: none (no box in {result['box_text']!r}; answered on the whole image)")
    click.echo(f"crop: {result['crop']} ({result['crop_size'][0]}x{result['crop_size'][1]})")
    click.echo(f"answer: {result['answer']}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--host", default=None, help="Address to bind (overrides the config); non-loopback needs an API key.")
@click.option("--port", type=int, default=None, help="TCP port (overrides the config).")
@click.option("--api-key", envvar="VISRL_API_KEY", default=None, show_envvar=True,
              help="Bearer key clients must send (prefer the environment variable: arguments show in `ps`).")
@workspace_option
def serve(config: str, host: str | None, port: int | None, api_key: str | None, workspace: str | None) -> None:
    """Serve a local model as an OpenAI-compatible chat-completions API (for the remote backend)."""
    from visrl.config import load_config
    from visrl.serve import ServeConfig
    from visrl.serve import serve as run_server

    overrides = {k: v for k, v in {"host": host, "port": port, "api_key": api_key}.items() if v is not None}
    cfg = load_config(ServeConfig, config, overrides)
    click.echo(f"loading {cfg.model_name_or_path}; it will answer as {cfg.model_name!r} at "
               f"http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)")
    run_server(cfg, workspace)
