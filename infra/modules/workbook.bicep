// The dashboard: an Azure Monitor workbook on the Application Insights component, so it opens
// from that resource (Workbooks) with its data. Its panels are KQL over the traces table, where
// the Functions host puts the handler's log lines; they read the lines' key=value fields
// (README, Log fields). The workbook itself is kept as JSON in infra/workbook/, so it can be
// edited in the portal and pasted back, and tests/workbook.rs checks each query's fields
// against what the handler prints.

param appInsightsName string
param location string
param tags object = {}

@description('Title in the portal; unique within the resource group.')
param displayName string

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// The JSON names its fallback resource with a placeholder: the component it belongs to.
var serializedData = replace(loadTextContent('../workbook/batch-jobs.workbook.json'), '__APP_INSIGHTS_ID__', appInsights.id)

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  // A workbook's name is a GUID; derived from the component, so a redeployment updates it.
  name: guid(appInsights.id, 'batch-jobs-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    sourceId: appInsights.id
    serializedData: serializedData
    version: '1.0'
  }
}

output id string = workbook.id
output displayName string = displayName
