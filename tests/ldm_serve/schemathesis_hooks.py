"""The schemathesis hooks of test_serve_schema.py (``SCHEMATHESIS_HOOKS``). JSON Schema cannot compare two items of
an array, so the schema cannot say that ``guidance_interval``'s low is below its high: a schema-valid
``[low, high]`` with low >= high is refused with a 4xx naming the field. That refusal, and only that one, is not a
failure of positive_data_acceptance (documenting the 4xx in the OpenAPI responses does not change what that check
expects); every other check still runs on those requests."""

from __future__ import annotations

import json

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData


def refuses_an_empty_guidance_interval(failure, case, response) -> bool:
    """Whether ``failure`` is the server refusing a body whose guidance_interval is ``[low, high]`` with
    low >= high, with a 4xx whose error names guidance_interval (ours in ``field``, OpenAI's in ``param``)."""
    interval = case.body.get("guidance_interval") if isinstance(case.body, dict) else None
    if not (isinstance(failure, RejectedPositiveData) and isinstance(interval, list) and len(interval) == 2
            and interval[0] >= interval[1] and 400 <= response.status_code < 500):
        return False
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return error.get("field", error.get("param")) == "guidance_interval"


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    return not refuses_an_empty_guidance_interval(failure, case, response)
