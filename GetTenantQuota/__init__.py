"""HTTP trigger: GET /api/tenants/{tenant}/quota, one tenant's rate windows."""

import json

import azure.functions as func

from shared.app import get_settings
from shared.faces import http_api

get_settings()  # a bad setting stops the function from loading; the host logs which one, at start


def main(req: func.HttpRequest) -> func.HttpResponse:
    reply = http_api.quota(req.headers, req.route_params.get("tenant", ""))
    return func.HttpResponse(
        json.dumps(reply.body), status_code=reply.status, headers=reply.headers, mimetype="application/json"
    )
