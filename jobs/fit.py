"""Fit the reference statistics of the fitted detectors (react, knn, vim, nci, fdbd, adascale) on in-distribution images."""

from __future__ import annotations

import argparse
import posixpath
import sys
import time
from typing import Any

from jobs import options
from jobs.options import run_main
from odin_engine.detectors.fit import DEFAULT_BANK_SIZE
from odin_engine.errors import ConfigError

CHUNK = 2048  # reference images per Ray task


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", metavar="SRC",
                        help="in-distribution reference images (a sample of the training set is the usual choice): "
                             "directory or .csv/.parquet manifest, local, s3://, gs://, file://; NOT the held-out set "
                             "that calibrates δ")
    options.add_model_options(parser)
    options.add_head_option(parser)
    parser.add_argument("--temperature", type=float, default=None,
                        help="ODIN's T (AdaSCALE shares ODIN's gradient at T); default: --tuning's, else 1000")
    parser.add_argument("--tuning", metavar="JSON", default=None, help="tuning.json whose T the fit uses")
    parser.add_argument("--output", metavar="FIT", help="the fit file to write (local or bucket), e.g. fit.npz")
    parser.add_argument("--bank-size", type=int, default=DEFAULT_BANK_SIZE,
                        help="features kept for KNN (a uniform sample of the reference set)")
    options.add_resize_option(parser)
    options.add_batch_size_option(parser)
    options.add_ray_options(parser)
    options.add_quiet_option(parser)
    options.add_config_option(parser)


def fit_reference(reference: str, output: str, model: str, weights: str | None = None, *, head: str | None = None,
                  temperature: float | None = None, tuning: str | None = None, bank_size: int = DEFAULT_BANK_SIZE,
                  resize: str = "crop", batch_size: int = 256, mean=None, std=None, input_size=None,
                  unsafe_pickle: bool = False, ray_address: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the fit as Ray tasks (one per chunk of ``CHUNK`` images), merge their accumulators as they finish
    (memory: a bank per task in flight), write the fit; returns its description."""
    import ray

    from jobs.ray_utils import connect_cluster
    from odin_engine.detectors.features import find_head
    from odin_engine.detectors.fit import FitAccumulator, vim_origin
    from odin_engine.detectors.reference import fit_uris
    from odin_engine.decide.tuning import resolve_settings
    from odin_engine.io.corpus import load_corpus
    from odin_engine.io.store import Store
    from odin_engine.loading import load_model

    for flag, value in (("--reference", reference), ("--output", output), ("--model", model)):
        if not value:
            raise ConfigError(f"{flag} is required")
    if not isinstance(bank_size, int) or bank_size < 1:
        raise ConfigError(f"--bank-size must be an integer >= 1; got {bank_size!r}")
    t, _, _ = resolve_settings(tuning, temperature, None)
    loaded = load_model(model, weights, mean=mean, std=std, input_size=input_size, unsafe_pickle=unsafe_pickle)
    found = find_head(loaded.module, loaded.input_size, head)
    corpus = load_corpus(reference)
    uris = corpus.table.column("uri").to_pylist()
    if not uris:
        raise ConfigError(f"--reference {reference} holds no images")
    folder, name = posixpath.split(str(output).rstrip("/"))
    store = Store(folder or ".")
    t0 = time.time()
    connect_cluster(ray_address, quiet=quiet)
    kwargs = dict(spec=model, weights=weights, mean=loaded.mean, std=loaded.std, input_size=loaded.input_size,
                  temperature=t, head=found.name, model_id=loaded.model_id, bank_size=bank_size, resize=resize,
                  batch_size=batch_size, unsafe_pickle=unsafe_pickle)
    task = ray.remote(num_cpus=1)(fit_uris)
    chunks = [uris[i:i + CHUNK] for i in range(0, len(uris), CHUNK)]
    w, b = found.weight.numpy(), found.bias.numpy()
    total = FitAccumulator(found.dim, vim_origin(w, b), bank_size, seed=len(chunks))
    errors: list[dict[str, str]] = []
    limit = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending, next_chunk, done = [], 0, 0
    while pending or next_chunk < len(chunks):
        while next_chunk < len(chunks) and len(pending) < limit:
            pending.append(task.remote(chunks[next_chunk], seed=next_chunk, **kwargs))
            next_chunk += 1
        ready, pending = ray.wait(pending, num_returns=1)
        acc, errs = ray.get(ready[0])
        total.merge(acc)
        errors += errs
        done += 1
        if not quiet:
            print(f"[fit] {done}/{len(chunks)} chunks, {total.n} images", file=sys.stderr, flush=True)
    sources = {"reference": reference, "n_listed": len(uris), "n_undecodable": len(errors),
               "undecodable": errors[:50], "resize": resize, "bank_size": bank_size}
    stats = total.finish(model_id=loaded.model_id, head=found.name, temperature=t, weight=w, bias=b, sources=sources)
    written = store.write_bytes(name, stats.to_bytes())
    return {**stats.header(), "written": written, "seconds": round(time.time() - t0, 1)}


def run(args: argparse.Namespace) -> int:
    out = fit_reference(args.reference, args.output, args.model, args.weights, head=args.head,
                        temperature=args.temperature, tuning=args.tuning, bank_size=args.bank_size,
                        resize=args.resize, batch_size=args.batch_size, mean=args.mean, std=args.std,
                        input_size=args.input_size, unsafe_pickle=args.unsafe_pickle, ray_address=args.ray_address,
                        quiet=args.quiet)
    print(f"fit: {out['n_reference']} reference images, bank {out['bank_rows']}, D={out['dim']}, head "
          f"{out['head']}; wrote {out['written']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(build_parser, run, prog="python -m jobs.fit", section="fit"))
