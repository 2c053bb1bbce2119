"""`randfeat serve`: a (defended) model behind an HTTP API, for the attacks to query over the wire.

Modules: [protocol][randfeat.serve.protocol] (the wire format, shared with the client
[HTTPModel][randfeat.eval.remote.HTTPModel]), [config][randfeat.serve.config] (what is served and
how), [decode][randfeat.serve.decode] (request validation), [batcher][randfeat.serve.batcher]
(micro-batching), [usage][randfeat.serve.usage] (per-key accounting), [guard][randfeat.serve.guard]
(query detection in front of the model), [app][randfeat.serve.app] (the FastAPI application) and
[run][randfeat.serve.run] (uvicorn, workers, background threads). The package imports only the
core and [randfeat.detect][]: turning `randfeat serve`'s options into a model (model sources,
data sets, calibration of ν and of the detector's threshold) is the command line's job,
[randfeat.cli.served_model][].

Needs the `serve` extra: `pip install "randfeat[serve]"` (FastAPI, uvicorn, httpx). This package
imports nothing at import time, so the client can use the protocol without the server's
dependencies.
"""
