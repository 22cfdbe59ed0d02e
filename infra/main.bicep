// Cancel Machine Action: a Flex Consumption Function App with a user-assigned identity, identity-only
// storage (shared keys off), Application Insights with Entra authentication, and every app setting
// of the contract. Deploy with `azd up`; then grant the identity a Defender app role with
// infra/grant-defender-permissions.sh (or .ps1).
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; names and tags derive from it.')
param environmentName string

// Regions that offer the Flex Consumption plan, as the Azure-Samples Flex quickstart for azd
// (functions-quickstart-python-http-azd, infra/main.bicep) lists them, a region without Flex would
// fail late, at the plan; and the Azure Government regions, where the app runs on Elastic Premium
// (planKind). azd offers only these when it asks for a location.
@minLength(1)
@description('Azure region for every resource: one that offers Flex Consumption, or an Azure Government region.')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'eastus2euap'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
  'usgovarizona'
  'usgovtexas'
  'usgovvirginia'
  'usdodcentral'
  'usdodeast'
])
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group name; empty = rg-<environmentName>.')
param resourceGroupName string = ''

@description('Function app name; empty = a unique name.')
param functionAppName string = ''

@description('Storage account name; empty = a unique name.')
param storageAccountName string = ''

@allowed(['Public', 'GCC', 'GCCHigh', 'DoD'])
@description('Defender cloud: picks the API host and the token scope (DEFENDER_CLOUD).')
param defenderCloud string = 'Public'

@description('Optional regional API root, e.g. https://eu.api.security.microsoft.com (DEFENDER_API_BASE_URL). Empty = by cloud.')
param defenderApiBaseUrl string = ''

@description('Optional token scope override (DEFENDER_TOKEN_SCOPE). Empty = by cloud.')
param defenderTokenScope string = ''

@description('Rolling rate windows, COUNT/SECONDS comma list (RATE_LIMITS).')
param rateLimits string = '100/60,1500/3600'

@description('Rolling windows of the list API\'s quota (LIST_RATE_LIMITS), for cancelPendingActions.')
param listRateLimits string = '100/60,1500/3600'
@description('Rolling windows of the get API\'s quota (GET_RATE_LIMITS), for verify.')
param getRateLimits string = '100/60,1500/3600'
@description('The shared quota key (RATE_LIMIT_KEY). Empty = cloud + identity.')
param rateLimitKey string = ''

@description('Margin added to every window, in ms (RATE_LIMIT_SAFETY_MS).')
param rateLimitSafetyMs int = 1000

@description('How long the HTTP trigger may wait for a slot before answering 429 (HTTP_MAX_WAIT_SECONDS).')
param httpMaxWaitSeconds int = 0

@description('Total time budget of one upstream cancel, in seconds (DEFENDER_TIMEOUT_SECONDS).')
param defenderTimeoutSeconds int = 30

@description('App ids / object ids allowed to call when App Service Authentication is on (ALLOWED_CALLERS). Needs authClientId.')
param allowedCallers string = ''

@description('Entra app registration (client id) that fronts the app with App Service Authentication. Empty = function keys only.')
param authClientId string = ''

// Flex Consumption's documented range for the maximum instance count has been 40 to 1000
// (learn.microsoft.com, event-driven-scaling "Limit scale-out"); a newer revision says 1 to 1000.
// 40 is valid under both, so values below it are refused here rather than late by the platform.
@description('Customer tenants this deployment cancels in, as name=tenantId pairs (TENANTS). Empty = the home tenant only.')
param tenants string = ''
@description('Client id of an existing multi-tenant app registration the customers consent to (TENANT_APP_CLIENT_ID). Ignored when manageTenantApp creates one.')
param tenantAppClientId string = ''
@description('Create the multi-tenant app registration and its federated credential with the Microsoft Graph Bicep extension (needs Application.ReadWrite.All).')
param manageTenantApp bool = false
@description('Turn on the log alert for Defender 429s or fail-closed answers (infra/log-queries.json). Off by default.')
param logAlertEnabled bool = false
@description('Hosting plan: flex (Flex Consumption, identity-only storage) or premium (Elastic Premium EP1, with a key-based content share). Azure Government always runs premium: it has no Flex Consumption.')
@allowed(['flex', 'premium'])
param planKind string = 'flex'

@description('Maximum instances of the Flex Consumption plan (40 to 1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

var abbrs = loadJsonContent('./abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }
var usePremium = planKind == 'premium' || environment().name == 'AzureUSGovernment'
var functionName = !empty(functionAppName) ? functionAppName : '${abbrs.webSitesFunctions}${resourceToken}'
// Blob container names must be lower case; a functionAppName given in capitals must not break them.
var deploymentContainer = toLower('app-package-${take(functionName, 32)}-${take(resourceToken, 7)}')

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: !empty(storageAccountName) ? storageAccountName : '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    deploymentContainer: deploymentContainer
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    appInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
    alertEnabled: logAlertEnabled
  }
}

module tenantApp 'app/tenant-app.bicep' = if (manageTenantApp) {
  name: 'tenant-app'
  scope: rg
  params: {
    uniqueName: 'cancel-machine-action-${resourceToken}'
    displayName: 'Cancel Machine Action (${environmentName})'
    identityPrincipalId: identity.outputs.principalId
  }
}
var tenantAppId = manageTenantApp ? tenantApp.outputs.appId : tenantAppClientId
module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
    principalId: identity.outputs.principalId
  }
}

// Every app setting. The host reaches its storage by identity (AzureWebJobsStorage__*) and sends
// telemetry with Entra authentication; then the contract's settings.
var hostSettings = {
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.outputs.clientId
  AzureWebJobsStorage__blobServiceUri: storage.outputs.blobEndpoint
  AzureWebJobsStorage__queueServiceUri: storage.outputs.queueEndpoint
  AzureWebJobsStorage__tableServiceUri: storage.outputs.tableEndpoint
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.outputs.clientId};Authorization=AAD'
}
var contractSettings = {
  DEFENDER_CLOUD: defenderCloud
  DEFENDER_API_BASE_URL: defenderApiBaseUrl
  DEFENDER_TOKEN_SCOPE: defenderTokenScope
  DEFENDER_TIMEOUT_SECONDS: string(defenderTimeoutSeconds)
  AZURE_CLIENT_ID: identity.outputs.clientId
  STATE_STORAGE: 'AzureWebJobsStorage'
  RATE_LIMITS: rateLimits
  LIST_RATE_LIMITS: listRateLimits
  GET_RATE_LIMITS: getRateLimits
  VERIFY_SECONDS: '30'
  RATE_LIMIT_KEY: rateLimitKey
  RATE_LIMIT_SAFETY_MS: string(rateLimitSafetyMs)
  HTTP_MAX_WAIT_SECONDS: string(httpMaxWaitSeconds)
  ALLOWED_CALLERS: allowedCallers
  AUTH_CLIENT_ID: authClientId // set exactly when auth.bicep turns App Service Authentication on
  AUDIT_TABLE: 'CancelAudit'
  RATE_LIMIT_TABLE: 'CancelRateLimit'
  IDEMPOTENCY_TABLE: 'CancelIdempotency'
  BULK_TABLE: 'CancelBulkJobs'
  LOG_LEVEL_SDK: 'WARNING'
  IDEMPOTENCY_LEASE_SECONDS: '360'
  TENANTS: tenants
  TENANT_APP_CLIENT_ID: tenantAppId
  HOME_TENANT_ID: tenant().tenantId
  AZURE_AUTHORITY_HOST: '' // by cloud (the app reads DEFENDER_CLOUD)
  TOKEN_EXCHANGE_AUDIENCE: '' // by cloud
}

module api 'app/api.bicep' = if (!usePremium) {
  name: 'api'
  scope: rg
  params: {
    name: functionName
    location: location
    tags: tags
    serviceName: 'api' // azd deploys to the one resource tagged azd-service-name: api (the site only)
    planName: '${abbrs.webServerFarms}${resourceToken}'
    identityId: identity.outputs.id
    storageAccountName: storage.outputs.name
    deploymentContainer: deploymentContainer
    maximumInstanceCount: maximumInstanceCount
    authClientId: authClientId
    appSettings: union(hostSettings, contractSettings)
  }
  dependsOn: [rbac]
}

module apiPremium 'app/api-premium.bicep' = if (usePremium) {
  name: 'api-premium'
  scope: rg
  params: {
    name: functionName
    location: location
    tags: tags
    serviceName: 'api'
    planName: '${abbrs.webServerFarms}${resourceToken}'
    contentStorageName: '${abbrs.storageStorageAccounts}c${resourceToken}'
    identityId: identity.outputs.id
    authClientId: authClientId
    appSettings: union(hostSettings, contractSettings)
  }
  dependsOn: [rbac]
}

output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = usePremium ? apiPremium.outputs.name : api.outputs.name
output SERVICE_API_URI string = usePremium ? apiPremium.outputs.uri : api.outputs.uri
output FUNCTION_APP_URL string = usePremium ? apiPremium.outputs.uri : api.outputs.uri
output PLAN_KIND string = usePremium ? 'premium' : 'flex'
output IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output IDENTITY_CLIENT_ID string = identity.outputs.clientId
output TENANT_APP_CLIENT_ID string = tenantAppId
output HOME_TENANT_ID string = tenant().tenantId
