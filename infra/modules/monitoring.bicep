// Log Analytics workspace + workspace-based Application Insights.
//
// Local (instrumentation key) authentication is disabled on the component, so telemetry is
// accepted only with an Entra ID token: the Function App sends
// APPLICATIONINSIGHTS_AUTHENTICATION_STRING=Authorization=AAD and holds Monitoring Metrics
// Publisher on the component (roles.bicep). In that mode the connection string is an address,
// not a credential.

param workspaceName string
param appInsightsName string
param location string
param tags object = {}

@description('Days logs are kept.')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
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
    IngestionMode: 'LogAnalytics'
    DisableLocalAuth: true
  }
}

output appInsightsName string = appInsights.name
output appInsightsId string = appInsights.id
