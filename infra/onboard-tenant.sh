#!/usr/bin/env bash
# Onboard a customer tenant to a multi-tenant deployment (TENANTS), with no secret:
#   1. print the admin consent URL the customer's admin opens once (the app registration's Defender
#      app roles, Machine.* - WindowsDefenderATP roles are not Microsoft Graph roles, so a Cloud
#      Application Administrator or Application Administrator of the customer may grant them);
#   2. check, through the deployed app, that a token for the tenant can be had (the federated
#      credential and the consent hold) and that Defender accepts it.
#
#   infra/onboard-tenant.sh --tenant <customer tenant id> --app-client-id <TENANT_APP_CLIENT_ID>
#                           [--cloud Public|GCC|GCCHigh|DoD]
#                           [--function-url https://<app>.azurewebsites.net --name <TENANTS name>]
#                           [--dry-run]
#
# The check needs the function key in FUNCTION_KEY (never on the command line, never printed). It
# cancels the nil action 00000000-0000-0000-0000-000000000000 in the tenant: Defender answers 404
# for it when it accepted the token, so it costs one call of that tenant's quota and one audit row.
# --dry-run prints every call (the consent URL and the check) and makes none.
set -euo pipefail

GUID_RE='^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
NAME_RE='^[a-z0-9][a-z0-9-]{0,62}$'
PROBE_ACTION="00000000-0000-0000-0000-000000000000"

tenant="" app="" cloud="Public" function_url="" name="" dry_run=0

die() { echo "error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --tenant) tenant="${2:-}"; shift 2 ;;
    --app-client-id) app="${2:-}"; shift 2 ;;
    --cloud) cloud="${2:-}"; shift 2 ;;
    --function-url) function_url="${2:-}"; shift 2 ;;
    --name) name="${2:-}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ "$tenant" =~ $GUID_RE ]] || die "--tenant must be the customer's directory (tenant) id, a GUID"
[[ "$app" =~ $GUID_RE ]] || die "--app-client-id must be the app registration's client id (TENANT_APP_CLIENT_ID), a GUID"
case "$cloud" in
  Public|GCC) login="https://login.microsoftonline.com" ;;
  GCCHigh|DoD) login="https://login.microsoftonline.us" ;;
  *) die "--cloud must be Public, GCC, GCCHigh or DoD" ;;
esac
if [ -n "$function_url" ]; then
  [[ "$function_url" =~ ^https?://[^/?#]+/?$ ]] || die "--function-url must be the app's root URL, e.g. https://func-x.azurewebsites.net"
  [ -n "$name" ] || name="$tenant"
  [[ "$name" =~ $NAME_RE ]] || [[ "$name" =~ $GUID_RE ]] || die "--name must be the tenant's TENANTS name (lower-case letters, digits, dashes) or its id"
fi

consent_url="$login/$tenant/adminconsent?client_id=$app"
probe_url="${function_url%/}/api/tenants/$name/machineactions/$PROBE_ACTION/cancel"

if [ "$dry_run" = 1 ]; then
  echo "1. the customer's admin opens: $consent_url"
  if [ -n "$function_url" ]; then
    echo "2. POST $probe_url"
    echo "   x-functions-key: <FUNCTION_KEY>"
    echo "   {\"Comment\": \"onboarding check\"}"
  fi
  exit 0
fi

echo "1. Send this link to an admin of tenant $tenant (Cloud Application Administrator, Application"
echo "   Administrator or Privileged Role Administrator). It asks once for the app's Defender roles:"
echo "   $consent_url"
[ -n "$function_url" ] || { echo "2. Re-run with --function-url (and FUNCTION_KEY set) to check the tenant."; exit 0; }
[ -n "${FUNCTION_KEY:-}" ] || die "set FUNCTION_KEY to the app's function key for the check (it is never printed)"
command -v curl >/dev/null || die "curl is needed for the check"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=$(curl -sS -o "$out" -w '%{http_code}' -X POST "$probe_url" -H "x-functions-key: $FUNCTION_KEY" \
  -H "Content-Type: application/json" -d '{"Comment": "onboarding check"}') || die "could not reach $function_url"
code=$(sed -n 's/.*"code": *"\([^"]*\)".*/\1/p' "$out" | head -n1)
message=$(sed -n 's/.*"message": *"\([^"]*\)".*/\1/p' "$out" | head -n1)

case "$status:$code" in
  404:ResourceNotFound|400:*)
    echo "2. ok: the app got a token for $name and Defender accepted it ($status $code for the nil action)" ;;
  404:TenantNotFound)
    die "the app does not serve '$name': add $name=$tenant to its TENANTS setting" ;;
  502:TokenUnavailable)
    case "$message" in
      *AADSTS700016:*|*AADSTS65001:*) die "no consent in $tenant yet: the admin must open the link above ($message)" ;;
      *AADSTS70021:*) die "the federated credential is new and not yet effective: retry in a few minutes ($message)" ;;
      *AADSTS7002[0-9][0-9]:*|*AADSTS7002[0-9][0-9][0-9]:*)
        die "the app registration's federated credential does not match the app's identity ($message)" ;;
      *) die "no token for $tenant: $message" ;;
    esac ;;
  401:*|403:Forbidden)
    die "Defender refused the token or the caller: the consent may lack a Machine.* role, or the key is wrong ($status ${message:-})" ;;
  *)
    die "unexpected answer $status ${code:-} ${message:-}" ;;
esac
