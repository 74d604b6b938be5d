"""One ``invoke bench``: find the endpoint, say what it is, sweep, and return the result."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from typing import Callable

from trtllm_deploy.errors import CheckFailed, InputError

from . import arrivals, environment, shapes, slo, sweep
from .client import Endpoint, new_loop, stream
from .report import SCHEMA
from .workload import Prompts, Workload


@dataclasses.dataclass(frozen=True)
class Shape:
    """The workload's shape as asked for: --workload, --prefix-tokens, --turns, --depths, --prompts,
    and --slo."""

    kind: str = "random"
    prefix_tokens: int = 0
    turns: int = 0
    depths: str = ""
    prompts: str = ""
    slo: str = ""


def measure(url: str = "", hosts: str = "", concurrency: str = "1,2,4,8", input_tokens: int = 128,
            output_tokens: int = 128, requests: int = 0, duration: float = 0.0, warmup: int = 2,
            repeats: int = 1, model: str = "", chat: bool = False, tokenizer: str = "",
            ignore_eos: bool = True, timeout_s: float = 600.0,
            progress: Callable[[str], None] = lambda line: None, request_rate: str = "",
            burstiness: float = 1.0, seed: int = 0, shape: Shape = Shape()) -> dict:
    if bool(url) == bool(hosts):
        raise InputError("give --url URL (any OpenAI-compatible server) or --hosts hosts.toml (the "
                         "cluster's current deployment), one of them")
    if output_tokens < 1:
        raise InputError("--output-tokens must be at least 1")
    plan = _rates(request_rate, burstiness, seed, concurrency)
    kind = _check_shape(shape, plan, concurrency)
    limits, target = slo.parse(shape.slo) if str(shape.slo).strip() else (None, slo.DEFAULT_TARGET)
    depth_levels = sweep.depths(shape.depths) if kind == "depth" else None
    levels = [] if plan else sweep.concurrencies(concurrency or ("1" if depth_levels else "1,2,4,8"))
    budget = sweep.Budget(requests, duration, warmup, repeats, timeout_s)
    given_prompts = shapes.FilePrompts(shape.prompts) if shape.prompts else None
    deployment = None
    if hosts:
        deployment, endpoint = environment.deployment_facts(hosts)
    else:
        endpoint = Endpoint.parse(url)
    # Before the endpoint is asked anything: a --tokenizer that cannot be used is the user's to fix.
    tokenizer_dir = environment.tokenizer_dir(deployment, tokenizer)
    if kind == "prefix":
        prompts = shapes.PrefixPrompts(input_tokens, shape.prefix_tokens or input_tokens // 2, tokenizer_dir,
                                       given=bool(tokenizer))
    else:
        prompts = Prompts(input_tokens, tokenizer_dir, given=bool(tokenizer))
    described = {"prefix": {"prefix_tokens": getattr(prompts, "prefix_tokens", 0)},
                 "multi-turn": {"turns": shape.turns or 3}, "depth": {"depths": depth_levels}}.get(kind, {})
    if given_prompts is not None:
        prompts, kind, described = given_prompts, "file", {"prompts": str(given_prompts.path),
                                                           "lines": len(given_prompts.lines)}
        chat = chat or given_prompts.chat
    facts = environment.endpoint_facts(endpoint)
    workload = Workload(input_tokens, output_tokens, chat or kind == "multi-turn", ignore_eos,
                        model or facts["model"], prompts.counted_by, kind=kind, shape=described)
    workload = _settle_options(endpoint, workload, prompts, timeout_s)
    started = datetime.datetime.now(datetime.timezone.utc)
    levels_measured = sweep.sweep(endpoint, workload, prompts, levels, budget, progress, plan, limits,
                                  depth_levels)
    return {"schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
            "environment": {"endpoint": facts, "deployment": deployment,
                            "client": environment.client_facts()},
            "workload": workload.as_json(), "budget": sweep.budget_json(budget),
            **({"arrivals": {"mode": "request rate", "burstiness": plan.burstiness, "seed": plan.seed,
                             "cap": plan.cap or None, "behind_ms": arrivals.BEHIND_MS}} if plan else {}),
            **({"slo": slo.record(limits, target, levels_measured)} if limits else {}),
            "levels": levels_measured}


def _check_shape(shape: Shape, plan: sweep.Rates | None, concurrency: str) -> str:
    """The workload's kind, once its flags agree with each other (before anything is sent)."""
    kind = shapes.check_kind(shape.kind)
    if shape.prompts and kind != "random":
        raise InputError(f"--prompts with --workload {kind}: a prompts file replaces the generated prompts; "
                         "leave --workload out (random)")
    if shape.prefix_tokens and kind != "prefix":
        raise InputError("--prefix-tokens belongs to --workload prefix")
    if shape.turns and kind != "multi-turn":
        raise InputError("--turns belongs to --workload multi-turn")
    if shape.turns < 0 or (kind == "multi-turn" and shape.turns == 1):
        raise InputError(f"--turns {shape.turns}: a conversation needs at least 2 turns")
    if str(shape.depths).strip() and kind != "depth":
        raise InputError("--depths belongs to --workload depth")
    if kind == "depth" and not str(shape.depths).strip():
        raise InputError("--workload depth needs --depths, the context depths in tokens: 0,4096,16384")
    if kind in ("multi-turn", "depth") and plan is not None:
        raise InputError(f"--workload {kind} runs at a concurrency, not at a --request-rate")
    if kind == "depth" and len(sweep.concurrencies(concurrency or "1")) > 1:
        raise InputError(f"--workload depth: --concurrency {concurrency!r} must be one number (default 1), "
                         "the streams at every depth")
    return kind


def _rates(request_rate: str, burstiness: float, seed: int, concurrency: str) -> sweep.Rates | None:
    """The open-loop plan of ``--request-rate``, capped by a single ``--concurrency``; None without it."""
    if not str(request_rate).strip():
        return None
    rates = arrivals.rates(request_rate)
    arrivals.check_burstiness(burstiness)
    cap = sweep.concurrencies(concurrency) if str(concurrency).strip() else [0]
    if len(cap) > 1:
        raise InputError(f"--concurrency {concurrency!r} with --request-rate: give one number, the most "
                         "requests in flight at once (or leave it out for no cap)")
    return sweep.Rates(tuple(rates), burstiness, seed, cap[0])


def _once(endpoint: Endpoint, workload: Workload, prompts: Prompts, timeout_s: float):
    first = prompts(0)
    if workload.kind == "multi-turn":
        first = {"messages": [{"role": "user", "content": first}]}
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(stream(endpoint, workload.path, workload.body(first), timeout_s))


def _settle_options(endpoint: Endpoint, workload: Workload, prompts: Prompts, timeout_s: float) -> Workload:
    """One request before anything is counted: if the server refuses ``ignore_eos``/``min_tokens``
    (strict OpenAI servers do), go on without them and say so in the result."""
    sample = _once(endpoint, workload, prompts, timeout_s)
    if sample.error and workload.ignore_eos and sample.error.startswith("http 4") and (
            "ignore_eos" in sample.detail or "min_tokens" in sample.detail or "extra" in sample.detail):
        workload = dataclasses.replace(workload, ignore_eos=False,
                                       ignore_eos_refused=f"{sample.error}: {sample.detail}"[:300])
        sample = _once(endpoint, workload, prompts, timeout_s)
    if sample.error:
        raise CheckFailed(f"{endpoint.url}{workload.path} failed a first streamed request: {sample.error}: "
                          f"{sample.detail}")
    return workload
