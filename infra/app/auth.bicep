// App Service Authentication in front of the app, for both plans: the platform validates Entra
// tokens for api://<authClientId>, answers 401 without one, strips forged X-MS-CLIENT-PRINCIPAL
// headers and sets its own, so ALLOWED_CALLERS can be trusted. Function keys stay required as well.
param siteName string
param authClientId string

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: siteName
}

resource auth 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'authsettingsV2'
  properties: {
    platform: { enabled: true }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: authClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
        }
        validation: {
          allowedAudiences: ['api://${authClientId}', authClientId]
        }
      }
    }
  }
}
