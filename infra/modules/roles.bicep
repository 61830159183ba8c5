// Every role assignment of the system, in one place, each with the narrowest built-in role and
// scope that does the job. Role definition ids are the built-in GUIDs (the same in every tenant):
// https://learn.microsoft.com/azure/role-based-access-control/built-in-roles
//
// | who                       | role                           | scope                  |
// |---------------------------|--------------------------------|------------------------|
// | Function App identity     | Storage Blob Data Owner        | storage account        |
// | Function App identity     | Storage Table Data Contributor | storage account        |
// | Function App identity     | Cognitive Services OpenAI User | Azure OpenAI account   |
// | Function App identity     | Monitoring Metrics Publisher   | Application Insights   |
// | Azure OpenAI identity     | Storage Blob Data Contributor  | storage account        |
// | Event Grid topic identity | Storage Blob Data Contributor  | dead-letter container  |
// | (optional) a user/group   | Storage Blob Data Contributor  | batch-input container  |
// | (optional) a user/group   | Storage Blob Data Reader       | batch-output container |
//
// Not granted, on purpose: Storage Queue Data Contributor and Storage Account Contributor. The
// docs require them only for the *blob trigger* (blob receipts and internal queues), which this
// app does not use: it has an Event Grid trigger (HTTP push) and a timer (blob leases only).

// Storage Blob Data Owner
var storageBlobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
// Storage Blob Data Contributor
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
// Storage Blob Data Reader
var storageBlobDataReader = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
// Storage Table Data Contributor
var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
// Cognitive Services OpenAI User
var cognitiveServicesOpenAIUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'
// Monitoring Metrics Publisher
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'

param storageAccountName string
param openAiAccountName string
param appInsightsName string
param inputContainerName string
param outputContainerName string
param deadLetterContainerName string

@description('Principal id of the Function App\'s system-assigned identity.')
param functionAppPrincipalId string

@description('Principal id of the Azure OpenAI account\'s system-assigned identity.')
param openAiPrincipalId string

@description('Principal id of the Event Grid system topic\'s system-assigned identity.')
param eventGridPrincipalId string

@description('Optional: a user, group or service principal that uploads inputs and reads results.')
param userPrincipalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param userPrincipalType string = 'User'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource inputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: inputContainerName
}

resource outputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: outputContainerName
}

resource deadLetterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deadLetterContainerName
}

resource openAi 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: openAiAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// Function App -> Storage Blob Data Owner on the account.
// Owner, not Contributor, because the Functions host's identity-based AzureWebJobsStorage needs it
// ("The Storage Blob Data Owner role covers the basic needs of Functions host storage": key store in
// azure-webjobs-secrets, timer schedule monitor and singleton blob leases in azure-webjobs-hosts,
// creating those containers). The same identity reads the Flex deployment package, and the
// handler reads inputs, writes/copies/deletes outputs and job records; Contributor would cover the
// handler alone, but one identity serves both and Owner is the documented minimum for the host.
resource appBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, functionAppPrincipalId, storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwner)
    principalId: functionAppPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Function App -> Storage Table Data Contributor on the account.
// The host persists diagnostic events (e.g. "the custom handler failed to start") in table storage
// through AzureWebJobsStorage; without this role they are lost and the log fills with warnings
// (docs: "No extension (host only), with support for diagnostic events": Blob Data Owner + Table
// Data Contributor). Nothing else uses tables.
resource appTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, functionAppPrincipalId, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: functionAppPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Function App -> Cognitive Services OpenAI User on the Azure OpenAI account: data-plane calls
// (create, list, get, cancel batches) with an Entra ID token; no management rights.
resource appOpenAiUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(openAi.id, functionAppPrincipalId, cognitiveServicesOpenAIUser)
  scope: openAi
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAIUser)
    principalId: functionAppPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Function App -> Monitoring Metrics Publisher on Application Insights: required to send
// telemetry with APPLICATIONINSIGHTS_AUTHENTICATION_STRING=Authorization=AAD.
resource appMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, functionAppPrincipalId, monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: functionAppPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Azure OpenAI (system-assigned identity) -> Storage Blob Data Contributor on the account: the
// batch service reads `input_blob` and writes `{output_folder}/{GUID}/results.jsonl` and
// errors.jsonl itself, with its own identity. This is the role and scope the Azure OpenAI docs
// prescribe (batch with Blob Storage); container scopes (read on batch-input, write on
// batch-output) would be narrower but are not what the docs test.
resource openAiBlobContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, openAiPrincipalId, storageBlobDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: openAiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Event Grid system topic -> Storage Blob Data Contributor on the dead-letter container only:
// deadLetterWithResourceIdentity writes undeliverable events there with the topic's identity.
resource eventGridDeadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetterContainer.id, eventGridPrincipalId, storageBlobDataContributor)
  scope: deadLetterContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: eventGridPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Optional: whoever uploads inputs (shared key is off, so `az storage blob upload --auth-mode login`
// needs a data role) ...
resource userInputContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(inputContainer.id, userPrincipalId, storageBlobDataContributor)
  scope: inputContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

// ... and reads the results.
resource userOutputReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(outputContainer.id, userPrincipalId, storageBlobDataReader)
  scope: outputContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReader)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}
