<#
.SYNOPSIS
Onboard a customer tenant to a multi-tenant deployment (TENANTS), with no secret.

.DESCRIPTION
1. Prints the admin consent URL the customer's admin opens once: the app registration's Defender
   app roles (Machine.*). They are not Microsoft Graph roles, so a Cloud Application Administrator
   or Application Administrator of the customer may grant them.
2. With -FunctionUrl: checks, through the deployed app, that a token for the tenant can be had (the
   federated credential and the consent hold) and that Defender accepts it. The function key comes
   from $env:FUNCTION_KEY and is never printed. The check cancels the nil action
   00000000-0000-0000-0000-000000000000 in the tenant: Defender answers 404 for it when it accepted
   the token, so it costs one call of that tenant's quota and one audit row.
-DryRun prints every call and makes none. The same steps as infra/onboard-tenant.sh.

.EXAMPLE
./infra/onboard-tenant.ps1 -Tenant <customer tenant id> -AppClientId <TENANT_APP_CLIENT_ID> -FunctionUrl https://func-x.azurewebsites.net -Name contoso -DryRun
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)]
    [ValidatePattern('^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$')]
    [string] $Tenant,

    [Parameter(Mandatory = $true)]
    [ValidatePattern('^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$')]
    [string] $AppClientId,

    [ValidateSet('Public', 'GCC', 'GCCHigh', 'DoD')]
    [string] $Cloud = 'Public',

    [ValidatePattern('^(https?://[^/?#]+/?)?$')]
    [string] $FunctionUrl = '',

    [ValidatePattern('^([a-z0-9][a-z0-9-]{0,62}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$')]
    [string] $Name = '',

    [switch] $DryRun
)
$ErrorActionPreference = 'Stop'
$ProbeAction = '00000000-0000-0000-0000-000000000000'
$Login = @{ Public = 'https://login.microsoftonline.com'; GCC = 'https://login.microsoftonline.com';
            GCCHigh = 'https://login.microsoftonline.us'; DoD = 'https://login.microsoftonline.us' }[$Cloud]
if (-not $Name) { $Name = $Tenant }
$ConsentUrl = "$Login/$Tenant/adminconsent?client_id=$AppClientId"
$ProbeUrl = "$($FunctionUrl.TrimEnd('/'))/api/tenants/$Name/machineactions/$ProbeAction/cancel"

if ($DryRun) {
    Write-Output "1. the customer's admin opens: $ConsentUrl"
    if ($FunctionUrl) {
        Write-Output "2. POST $ProbeUrl"
        Write-Output '   x-functions-key: <FUNCTION_KEY>'
        Write-Output '   {"Comment": "onboarding check"}'
    }
    return
}

Write-Output "1. Send this link to an admin of tenant $Tenant (Cloud Application Administrator, Application"
Write-Output "   Administrator or Privileged Role Administrator). It asks once for the app's Defender roles:"
Write-Output "   $ConsentUrl"
if (-not $FunctionUrl) { Write-Output '2. Re-run with -FunctionUrl (and $env:FUNCTION_KEY set) to check the tenant.'; return }
if (-not $env:FUNCTION_KEY) { throw 'Set $env:FUNCTION_KEY to the app''s function key for the check (it is never printed).' }

$response = Invoke-WebRequest -Method Post -Uri $ProbeUrl -SkipHttpErrorCheck -ContentType 'application/json' `
    -Headers @{ 'x-functions-key' = $env:FUNCTION_KEY } -Body '{"Comment": "onboarding check"}'
$status = [int] $response.StatusCode
$errorBody = try { ($response.Content | ConvertFrom-Json).error } catch { $null }
$code = if ($errorBody) { $errorBody.code } else { '' }
$message = if ($errorBody) { $errorBody.message } else { '' }

if (($status -eq 404 -and $code -eq 'ResourceNotFound') -or $status -eq 400) {
    Write-Output "2. ok: the app got a token for $Name and Defender accepted it ($status $code for the nil action)"
} elseif ($status -eq 404 -and $code -eq 'TenantNotFound') {
    throw "The app does not serve '$Name': add $Name=$Tenant to its TENANTS setting"
} elseif ($status -eq 502 -and $code -eq 'TokenUnavailable') {
    if ($message -match 'AADSTS700016:|AADSTS65001:') { throw "No consent in $Tenant yet: the admin must open the link above ($message)" }
    if ($message -match 'AADSTS70021:') { throw "The federated credential is new and not yet effective: retry in a few minutes ($message)" }
    if ($message -match 'AADSTS7002\d{2,3}:') { throw "The app registration's federated credential does not match the app's identity ($message)" }
    throw "No token for ${Tenant}: $message"
} elseif ($status -eq 401 -or $status -eq 403) {
    throw "Defender refused the token or the caller: the consent may lack a Machine.* role, or the key is wrong ($status $message)"
} else {
    throw "Unexpected answer $status $code $message"
}
