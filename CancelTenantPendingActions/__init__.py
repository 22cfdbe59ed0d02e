"""HTTP trigger: POST /api/tenants/{tenant}/machines/{machineId}/cancelPendingActions, in a TENANTS tenant."""

import json

import azure.functions as func

from shared.app import get_settings
from shared.faces import http_api

get_settings()  # a bad setting stops the function from loading; the host logs which one, at start


def main(req: func.HttpRequest) -> func.HttpResponse:
    params = req.route_params
    reply = http_api.cancel_pending(
        params.get("machineId", ""), req.get_body(), req.headers, params.get("tenant", ""), url=req.url
    )
    return func.HttpResponse(
        json.dumps(reply.body), status_code=reply.status, headers=reply.headers, mimetype="application/json"
    )
