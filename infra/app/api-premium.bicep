// The Function App on an Elastic Premium plan (EP1, Linux, Python 3.11), for Azure Government
// (GCC High, DoD), which has no Flex Consumption. Premium keeps the app's code on an Azure Files
// content share, and Azure Files takes only a connection string (no identity: MicrosoftDocs
// azure-docs, storage-considerations.md, "Create an app without Azure Files"). So the share lives
// in a storage account of its own, the only one with shared-key access, holding nothing but the
// code; the host's state, the queues and the app's tables stay on the identity-only account.
param name string
param location string
param tags object = {}
@description('azd service name from azure.yaml: tagged on the site only, never on the plan (azd deploy needs exactly one resource with it).')
param serviceName string = 'api'
param planName string
param contentStorageName string
param identityId string
@description('Most instances the plan scales out to.')
@minValue(1)
@maxValue(100)
param maximumElasticWorkerCount int = 20
@description('Every app setting: host storage and telemetry by identity, and the contract settings (main.bicep).')
param appSettings object
@description('Entra app registration client id for App Service Authentication; empty = off.')
param authClientId string = ''

var shareName = toLower(take(name, 63))

resource content 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: contentStorageName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    allowSharedKeyAccess: true // Azure Files takes a key; this account holds only the content share
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
  }
}

resource fileService 'Microsoft.Storage/storageAccounts/fileServices@2023-05-01' = {
  parent: content
  name: 'default'
}

resource share 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: shareName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'elastic'
  sku: { tier: 'ElasticPremium', name: 'EP1' }
  properties: {
    reserved: true
    maximumElasticWorkerCount: maximumElasticWorkerCount
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': serviceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      linuxFxVersion: 'Python|3.11'
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
    }
  }
}

// The settings Premium needs and Flex Consumption refuses: the worker runtime, the Functions
// version, the content share, and a remote build, so the Python packages are installed on deploy
// (run-functions-from-deployment-package.md: SCM_DO_BUILD_DURING_DEPLOYMENT, and ENABLE_ORYX_BUILD on Linux).
var premiumSettings = {
  FUNCTIONS_WORKER_RUNTIME: 'python'
  FUNCTIONS_EXTENSION_VERSION: '~4'
  SCM_DO_BUILD_DURING_DEPLOYMENT: 'true'
  ENABLE_ORYX_BUILD: 'true'
  WEBSITE_CONTENTAZUREFILECONNECTIONSTRING: 'DefaultEndpointsProtocol=https;AccountName=${content.name};EndpointSuffix=${environment().suffixes.storage};AccountKey=${content.listKeys().keys[0].value}'
  WEBSITE_CONTENTSHARE: shareName
}

resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: union(premiumSettings, appSettings)
  dependsOn: [share]
}

module auth 'auth.bicep' = if (!empty(authClientId)) {
  name: '${name}-auth'
  params: {
    siteName: site.name
    authClientId: authClientId
  }
}

output name string = site.name
output uri string = 'https://${site.properties.defaultHostName}'
