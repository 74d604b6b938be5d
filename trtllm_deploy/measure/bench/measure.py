"""One ``invoke bench``: find the endpoint, say what it is, sweep, and return the result."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from typing import Callable

from trtllm_deploy.errors import CheckFailed, InputError

from . import arrivals, environment, sweep
from .client import Endpoint, new_loop, stream
from .report import SCHEMA
from .workload import Prompts, Workload


def measure(url: str = "", hosts: str = "", concurrency: str = "1,2,4,8", input_tokens: int = 128,
            output_tokens: int = 128, requests: int = 0, duration: float = 0.0, warmup: int = 2,
            repeats: int = 1, model: str = "", chat: bool = False, tokenizer: str = "",
            ignore_eos: bool = True, timeout_s: float = 600.0,
            progress: Callable[[str], None] = lambda line: None, request_rate: str = "",
            burstiness: float = 1.0, seed: int = 0) -> dict:
    if bool(url) == bool(hosts):
        raise InputError("give --url URL (any OpenAI-compatible server) or --hosts hosts.toml (the "
                         "cluster's current deployment), one of them")
    if output_tokens < 1:
        raise InputError("--output-tokens must be at least 1")
    plan = _rates(request_rate, burstiness, seed, concurrency)
    levels = [] if plan else sweep.concurrencies(concurrency or "1,2,4,8")
    budget = sweep.Budget(requests, duration, warmup, repeats, timeout_s)
    deployment = None
    if hosts:
        deployment, endpoint = environment.deployment_facts(hosts)
    else:
        endpoint = Endpoint.parse(url)
    # Before the endpoint is asked anything: a --tokenizer that cannot be used is the user's to fix.
    prompts = Prompts(input_tokens, environment.tokenizer_dir(deployment, tokenizer), given=bool(tokenizer))
    facts = environment.endpoint_facts(endpoint)
    workload = Workload(input_tokens, output_tokens, chat, ignore_eos, model or facts["model"],
                        prompts.counted_by)
    workload = _settle_options(endpoint, workload, prompts, timeout_s)
    started = datetime.datetime.now(datetime.timezone.utc)
    levels_measured = sweep.sweep(endpoint, workload, prompts, levels, budget, progress, plan)
    return {"schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
            "environment": {"endpoint": facts, "deployment": deployment,
                            "client": environment.client_facts()},
            "workload": workload.as_json(), "budget": sweep.budget_json(budget),
            **({"arrivals": {"mode": "request rate", "burstiness": plan.burstiness, "seed": plan.seed,
                             "cap": plan.cap or None, "behind_ms": arrivals.BEHIND_MS}} if plan else {}),
            "levels": levels_measured}


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
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(stream(endpoint, workload.path, workload.body(prompts(0)), timeout_s))


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
