#!/usr/bin/env bash
# Grant the app's managed identity one Defender for Endpoint app role (Machine.*), through
# Microsoft Graph. A managed identity cannot be given API permissions in the portal: the role is
# assigned on the WindowsDefenderATP service principal with appRoleAssignedTo.
#
# Needs: az CLI signed in as someone with AppRoleAssignment.ReadWrite.All + Application.Read.All
# (e.g. Privileged Role Administrator). Idempotent: an existing assignment is reported, not redone.
#
#   infra/grant-defender-permissions.sh --principal-id <identity object id> [--role Machine.Isolate]
#                                       [--cloud Public|GCC|GCCHigh|DoD] [--dry-run]
#                                       [--resource-sp-id <id> --app-role-id <id>]
#
# --dry-run prints every Graph call it would make (method, URL, body) and makes none. Give
# --resource-sp-id and --app-role-id (from an earlier lookup) to make the calls fully concrete.
set -euo pipefail

DEFENDER_APP_ID="fc780465-2017-40d4-a0c5-307022471b92" # WindowsDefenderATP
# Any one action role lets the app cancel; Machine.Read.All (or Machine.ReadWrite.All) lets it list a
# machine's actions (cancelPendingActions) and read one back (verify). Run once per role.
ROLES="Machine.CollectForensics Machine.Isolate Machine.RestrictExecution Machine.Scan Machine.Offboard Machine.StopAndQuarantine Machine.LiveResponse Machine.Read.All Machine.ReadWrite.All"
GUID_RE='^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'

principal_id="" role="Machine.Isolate" cloud="Public" dry_run=0 resource_sp_id="" app_role_id=""

die() { echo "error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --principal-id) principal_id="${2:-}"; shift 2 ;;
    --role) role="${2:-}"; shift 2 ;;
    --cloud) cloud="${2:-}"; shift 2 ;;
    --resource-sp-id) resource_sp_id="${2:-}"; shift 2 ;;
    --app-role-id) app_role_id="${2:-}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ "$principal_id" =~ $GUID_RE ]] || die "--principal-id must be the identity's object (principal) id, a GUID; azd prints it as IDENTITY_PRINCIPAL_ID"
case " $ROLES " in *" $role "*) ;; *) die "--role must be one of: $ROLES" ;; esac
case "$cloud" in
  Public|GCC) graph="https://graph.microsoft.com" ;;
  GCCHigh) graph="https://graph.microsoft.us" ;;
  DoD) graph="https://dod-graph.microsoft.us" ;;
  *) die "--cloud must be Public, GCC, GCCHigh or DoD" ;;
esac
for id in "$resource_sp_id" "$app_role_id"; do
  [ -z "$id" ] || [[ "$id" =~ $GUID_RE ]] || die "--resource-sp-id and --app-role-id must be GUIDs"
done

# Every az rest call names its token resource: az derives it only from the signed-in cloud's own
# Graph endpoint, and sends no token at all for dod-graph.microsoft.us.
lookup_url="$graph/v1.0/servicePrincipals?\$filter=appId%20eq%20'$DEFENDER_APP_ID'&\$select=id,appRoles"

if [ "$dry_run" = 1 ]; then
  sp="${resource_sp_id:-<id of WindowsDefenderATP from call 1>}"
  rid="${app_role_id:-<id of $role from call 1>}"
  n=1
  if [ -z "$resource_sp_id" ] || [ -z "$app_role_id" ]; then
    echo "$n. GET $lookup_url"; n=$((n + 1))
  fi
  echo "$n. GET $graph/v1.0/servicePrincipals/$principal_id/appRoleAssignments"; n=$((n + 1))
  echo "$n. POST $graph/v1.0/servicePrincipals/$sp/appRoleAssignedTo (only if call $((n - 1)) shows no such assignment)"
  echo "   {\"principalId\": \"$principal_id\", \"resourceId\": \"$sp\", \"appRoleId\": \"$rid\"}"
  exit 0
fi

command -v az >/dev/null || die "the az CLI is not installed (https://aka.ms/azcli), or use --dry-run"
az account show >/dev/null 2>&1 || die "az is not signed in: run 'az login' (for GCC High / DoD: az cloud set --name AzureUSGovernment first)"

if [ -z "$resource_sp_id" ] || [ -z "$app_role_id" ]; then
  found=$(az rest --method GET --url "$lookup_url" --resource "$graph" --query "value[0].[id, appRoles[?value=='$role'].id | [0]]" -o tsv) \
    || die "could not read the WindowsDefenderATP service principal (needs Application.Read.All)"
  resource_sp_id=$(cut -f1 <<<"$found")
  app_role_id=$(cut -f2 <<<"$found")
  [ -n "$resource_sp_id" ] || die "WindowsDefenderATP ($DEFENDER_APP_ID) has no service principal in this tenant: is Defender for Endpoint onboarded?"
  [ -n "$app_role_id" ] && [ "$app_role_id" != "None" ] || die "WindowsDefenderATP has no app role $role"
fi

existing=$(az rest --method GET --url "$graph/v1.0/servicePrincipals/$principal_id/appRoleAssignments" --resource "$graph" \
  --query "value[?resourceId=='$resource_sp_id' && appRoleId=='$app_role_id'] | length(@)" -o tsv) \
  || die "could not read the identity's app role assignments: is $principal_id a service principal in this tenant?"
if [ "$existing" != "0" ]; then
  echo "already granted: $role to $principal_id"
  exit 0
fi

body="{\"principalId\": \"$principal_id\", \"resourceId\": \"$resource_sp_id\", \"appRoleId\": \"$app_role_id\"}"
az rest --method POST --url "$graph/v1.0/servicePrincipals/$resource_sp_id/appRoleAssignedTo" --resource "$graph" \
  --headers "Content-Type=application/json" --body "$body" >/dev/null \
  || die "the assignment failed (needs AppRoleAssignment.ReadWrite.All)"
echo "granted: $role to $principal_id (a new token carries it within minutes; restart the app to drop its cached token)"
