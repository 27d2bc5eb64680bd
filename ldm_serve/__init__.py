"""``ldm-serve``: text-to-image over HTTP with step-level batching.

- ``cli``: the command line, a leaf that nothing imports
- ``server``: the server assembled from its flags (``build_app``, ``DrainingServer``), for one process and each replica
- ``replicas``: ``--replicas N``, the same app in Ray Serve replicas (imports ray)
- ``app``: the FastAPI app (``create_app``) and its OpenAPI schema
- ``routes``: the images routes (answered whole or streamed, and cancel) and the status routes
- ``events``: a streamed request's server-sent events, ours and OpenAI's
- ``request_schema``: a request's body, its schema under the server's limits and its parse
- ``errors``: ``ApiError`` and the JSON error answers, ours and OpenAI's
- ``middleware``: the body limit, the API key, and the last-resort JSON 500
- ``browser``: what other web pages may do: the Host allow-list, CORS, the security headers
- ``metrics``: the Prometheus metrics
- ``batcher``: the queue and the worker thread that batches requests at step boundaries
- ``protocol``: uvicorn's HTTP/1.1 connection with read timeouts
- ``text_cache``: the text encodings of recent prompts
- ``page.html``: the page to try it in a browser
"""
