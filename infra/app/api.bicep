// The Function App on the Flex Consumption plan (Python 3.11), running as the user-assigned
// identity: storage by identity (no keys), telemetry by Entra, Defender by managed identity token.
param name string
param location string
param tags object = {}
@description('azd service name from azure.yaml: tagged on the site only, never on the plan (azd deploy needs exactly one resource with it).')
param serviceName string = 'api'
param planName string
param identityId string
param storageAccountName string
param deploymentContainer string
param maximumInstanceCount int
@description('Every app setting: host storage and telemetry by identity, and the contract settings (main.bicep).')
param appSettings object
@description('Entra app registration client id for App Service Authentication; empty = off.')
param authClientId string = ''

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
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
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: 2048
      }
      runtime: { name: 'python', version: '3.11' }
    }
  }
}

resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: appSettings
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
