// Log Analytics and Application Insights with local (key) authentication off: telemetry is
// accepted only from Entra identities holding Monitoring Metrics Publisher.
param logAnalyticsName string
param appInsightsName string
param location string
param tags object = {}
@description('Turn the alert on: Defender 429s or fail-closed answers above alertThreshold in 15 minutes.')
param alertEnabled bool = false
@description('How many such records in 15 minutes fire the alert.')
param alertThreshold int = 0

// The app's saved log queries and its alert, from one file the tests check against the records the
// app writes (tests/integration/test_logs.py): docs/logs.md shows the same queries.
var logQueries = loadJsonContent('../log-queries.json')

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

resource savedSearches 'Microsoft.OperationalInsights/workspaces/savedSearches@2020-08-01' = [
  for q in logQueries.savedSearches: {
    parent: workspace
    name: 'cancel-machine-action-${q.name}'
    properties: {
      category: 'Cancel Machine Action'
      displayName: q.displayName
      query: q.query
      version: 2
    }
  }
]

// Off by default (alertEnabled): with no action group it only shows in Azure Monitor's alerts.
resource alert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'cancel-machine-action-${logQueries.alert.name}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: logQueries.alert.displayName
    description: logQueries.alert.description
    enabled: alertEnabled
    severity: 2
    scopes: [workspace.id]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: logQueries.alert.query
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: alertThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
  }
}

output appInsightsName string = appInsights.name
output connectionString string = appInsights.properties.ConnectionString
