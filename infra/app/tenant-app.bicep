// The multi-tenant app registration an MSSP's customers consent to, and the federated credential by
// which it trusts the function app's user-assigned identity: no secret anywhere. Microsoft Graph
// Bicep extension (v1.0 types 1.0.0, Bicep >= 0.36.1; alias in infra/bicepconfig.json). Deploying
// it needs Application.ReadWrite.All, e.g. the Application Developer or Application Administrator
// role; without it, set manageTenantApp=false and run the one `az ad app federated-credential create`
// command in docs/tenants.md instead.
extension microsoftGraphV1

@description('Unique name of the app registration (idempotent key of the Graph resource).')
param uniqueName string
@description('Display name customers see on the consent prompt.')
param displayName string
@description('Object (principal) id of the function app\'s user-assigned identity: the credential\'s subject.')
param identityPrincipalId string
@description('Defender app roles the customers consent to (values of WindowsDefenderATP app roles).')
param roles array = ['Machine.Isolate', 'Machine.Scan', 'Machine.CollectForensics', 'Machine.RestrictExecution', 'Machine.Read.All']

// Issuer: the home tenant's authority; audience: the exchange audience of this cloud (Entra Workload
// ID docs, "Configure an application to trust a managed identity"). Subject matching is case-sensitive.
var issuer = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
var audience = environment().name == 'AzureUSGovernment' ? 'api://AzureADTokenExchangeUSGov' : 'api://AzureADTokenExchange'

// WindowsDefenderATP, whose app roles the registration asks for: present in a tenant with Defender
// for Endpoint onboarded (else: az ad sp create --id fc780465-2017-40d4-a0c5-307022471b92).
resource defender 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: 'fc780465-2017-40d4-a0c5-307022471b92'
}

resource app 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMultipleOrgs'
  requiredResourceAccess: [
    {
      resourceAppId: defender.appId
      resourceAccess: [for role in roles: {
        id: filter(defender.appRoles, r => r.value == role)[0].id
        type: 'Role'
      }]
    }
  ]

  resource trust 'federatedIdentityCredentials@v1.0' = {
    name: '${app.uniqueName}/function-app-identity'
    description: 'The function app\'s user-assigned managed identity'
    issuer: issuer
    subject: identityPrincipalId
    audiences: [audience]
  }
}

output appId string = app.appId
output issuer string = issuer
output audience string = audience
