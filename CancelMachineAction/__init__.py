"""HTTP trigger: POST /api/machineactions/{actionId}/cancel, answered as Defender answered."""

import json

import azure.functions as func

from shared.app import get_settings
from shared.faces import http_api

get_settings()  # a bad setting stops the function from loading; the host logs which one, at start


def main(req: func.HttpRequest) -> func.HttpResponse:
    reply = http_api.cancel(req.route_params.get("actionId", ""), req.get_body(), req.headers)
    return func.HttpResponse(
        json.dumps(reply.body),
        status_code=reply.status,
        headers=reply.headers,
        mimetype="application/json",
    )
