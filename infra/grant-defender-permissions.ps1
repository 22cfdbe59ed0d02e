<#
.SYNOPSIS
Grant the app's managed identity one Defender for Endpoint app role (Machine.*) through Microsoft Graph.

.DESCRIPTION
A managed identity cannot be given API permissions in the portal: the role is assigned on the
WindowsDefenderATP service principal (appId fc780465-2017-40d4-a0c5-307022471b92) with
appRoleAssignedTo. Needs the Microsoft.Graph module and a sign-in with
AppRoleAssignment.ReadWrite.All and Application.Read.All. Idempotent: an existing assignment is
reported, not redone. -DryRun prints every Graph call it would make and makes none.

.EXAMPLE
./infra/grant-defender-permissions.ps1 -PrincipalId <IDENTITY_PRINCIPAL_ID> -Role Machine.Isolate -DryRun
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)]
    [ValidatePattern('^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$')]
    [string] $PrincipalId,

    # Any one action role lets the app cancel; Machine.Read.All (or ReadWrite.All) lets it list a machine's
    # actions (cancelPendingActions) and read one back (verify). Run once per role.
    [ValidateSet('Machine.CollectForensics', 'Machine.Isolate', 'Machine.RestrictExecution', 'Machine.Scan',
        'Machine.Offboard', 'Machine.StopAndQuarantine', 'Machine.LiveResponse', 'Machine.Read.All',
        'Machine.ReadWrite.All')]
    [string] $Role = 'Machine.Isolate',

    [ValidateSet('Public', 'GCC', 'GCCHigh', 'DoD')]
    [string] $Cloud = 'Public',

    [string] $ResourceSpId = '',
    [string] $AppRoleId = '',
    [switch] $DryRun
)
$ErrorActionPreference = 'Stop'
$DefenderAppId = 'fc780465-2017-40d4-a0c5-307022471b92'  # WindowsDefenderATP
$Graph = @{ Public = 'https://graph.microsoft.com'; GCC = 'https://graph.microsoft.com';
            GCCHigh = 'https://graph.microsoft.us'; DoD = 'https://dod-graph.microsoft.us' }[$Cloud]
$Environment = @{ Public = 'Global'; GCC = 'Global'; GCCHigh = 'USGov'; DoD = 'USGovDoD' }[$Cloud]
$LookupUrl = "$Graph/v1.0/servicePrincipals?`$filter=appId%20eq%20'$DefenderAppId'&`$select=id,appRoles"

if ($DryRun) {
    $sp = if ($ResourceSpId) { $ResourceSpId } else { '<id of WindowsDefenderATP from call 1>' }
    $rid = if ($AppRoleId) { $AppRoleId } else { "<id of $Role from call 1>" }
    $n = 1
    if (-not ($ResourceSpId -and $AppRoleId)) { Write-Output "$n. GET $LookupUrl"; $n++ }
    Write-Output "$n. GET $Graph/v1.0/servicePrincipals/$PrincipalId/appRoleAssignments"; $n++
    Write-Output "$n. POST $Graph/v1.0/servicePrincipals/$sp/appRoleAssignedTo (only if call $($n - 1) shows no such assignment)"
    Write-Output "   {`"principalId`": `"$PrincipalId`", `"resourceId`": `"$sp`", `"appRoleId`": `"$rid`"}"
    return
}

if (-not (Get-Module -ListAvailable -Name Microsoft.Graph.Applications)) {
    throw 'The Microsoft.Graph module is not installed: Install-Module Microsoft.Graph -Scope CurrentUser (or use -DryRun)'
}
Connect-MgGraph -Environment $Environment -Scopes 'AppRoleAssignment.ReadWrite.All', 'Application.Read.All' -NoWelcome

if (-not ($ResourceSpId -and $AppRoleId)) {
    $defender = Get-MgServicePrincipal -Filter "appId eq '$DefenderAppId'" -Property 'id,appRoles'
    if (-not $defender) { throw "WindowsDefenderATP ($DefenderAppId) has no service principal in this tenant: is Defender for Endpoint onboarded?" }
    $ResourceSpId = $defender.Id
    $AppRoleId = ($defender.AppRoles | Where-Object { $_.Value -eq $Role }).Id
    if (-not $AppRoleId) { throw "WindowsDefenderATP has no app role $Role" }
}

$existing = Get-MgServicePrincipalAppRoleAssignment -ServicePrincipalId $PrincipalId -All |
    Where-Object { $_.ResourceId -eq $ResourceSpId -and $_.AppRoleId -eq $AppRoleId }
if ($existing) {
    Write-Output "already granted: $Role to $PrincipalId"
    return
}
New-MgServicePrincipalAppRoleAssignedTo -ServicePrincipalId $ResourceSpId -BodyParameter @{
    principalId = $PrincipalId; resourceId = $ResourceSpId; appRoleId = $AppRoleId
} | Out-Null
Write-Output "granted: $Role to $PrincipalId (a new token carries it within minutes; restart the app to drop its cached token)"
