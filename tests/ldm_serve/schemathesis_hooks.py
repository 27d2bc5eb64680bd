"""The schemathesis hooks of test_serve_schema.py (``SCHEMATHESIS_HOOKS``). Two things a schema-valid request can
get wrong are beyond what JSON Schema can say, so the server refuses them with a 4xx naming the field, and only
those refusals are not failures of positive_data_acceptance (documenting the 4xx in the OpenAPI responses does not
change what that check expects); every other check still runs on those requests:

- JSON Schema cannot compare two items of an array, so it cannot say that ``guidance_interval``'s low is below its
  high: a schema-valid ``[low, high]`` with low >= high is refused naming guidance_interval.
- JSON Schema cannot look inside an image: a schema-valid ``init_image`` or ``mask`` (base64 of any bytes) on
  ``/v1/images``, or ``image`` or ``mask`` file (schemathesis sends a 1x1 PNG) on ``/v1/images/edits``, is refused
  naming that field when its bytes are not an image of a size the model makes (or a mask of the image's size).
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

IMAGE_FIELDS = ("init_image", "mask", "image")


def _refused_naming(response, names: tuple[str, ...]) -> bool:
    """Whether ``response`` is a 4xx whose error names one of ``names`` (ours in ``field``, OpenAI's in ``param``)."""
    if not 400 <= response.status_code < 500:
        return False
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return error.get("field", error.get("param")) in names


def refuses_an_empty_guidance_interval(failure, case, response) -> bool:
    """Whether ``failure`` is the server refusing a body whose guidance_interval is ``[low, high]`` with
    low >= high, with a 4xx whose error names guidance_interval."""
    interval = case.body.get("guidance_interval") if isinstance(case.body, dict) else None
    return (isinstance(failure, RejectedPositiveData) and isinstance(interval, list) and len(interval) == 2
            and interval[0] >= interval[1] and _refused_naming(response, ("guidance_interval",)))


def refuses_an_image_it_cannot_edit(failure, case, response) -> bool:
    """Whether ``failure`` is the server refusing an image field the body carries, with a 4xx naming it."""
    given = tuple(name for name in IMAGE_FIELDS if isinstance(case.body, dict) and case.body.get(name) is not None)
    return isinstance(failure, RejectedPositiveData) and bool(given) and _refused_naming(response, given)


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    return not (refuses_an_empty_guidance_interval(failure, case, response)
                or refuses_an_image_it_cannot_edit(failure, case, response))
