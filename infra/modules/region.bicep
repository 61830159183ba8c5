// One more region for the handler's pool: an Azure OpenAI account with the same batch deployment
// as the main one, and the two role assignments that make it usable (main.bicep calls this once
// per entry of extraOpenAiLocations, and lists every endpoint in AZURE_OPENAI_ENDPOINT).
//
// | who                       | role                           | scope                  |
// |---------------------------|--------------------------------|------------------------|
// | Function App identity     | Cognitive Services OpenAI User | this Azure OpenAI acct |
// | this account's identity   | Storage Blob Data Contributor  | storage account        |
//
// The same grants roles.bicep gives the main account, for the same reasons: the handler calls
// the batch API with an Entra ID token, and the batch service reads input_blob and writes
// output_folder with the account's own system-assigned identity.

@description('Account name; also its custom subdomain, so globally unique.')
@minLength(2)
@maxLength(64)
param name string

@description('Region of this account. Must offer the model as a batch deployment.')
param location string

param tags object = {}

@description('Deployment name: the same as the main region, the value of body.model on every line.')
param deploymentName string

param modelName string
param modelVersion string

@allowed([
  'GlobalBatch'
  'DataZoneBatch'
])
param skuName string = 'GlobalBatch'

@minValue(1)
param capacity int

param storageAccountName string

@description('Principal id of the Function App system-assigned identity.')
param functionAppPrincipalId string

// Storage Blob Data Contributor
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
// Cognitive Services OpenAI User
var cognitiveServicesOpenAIUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

module openAi 'openai.bicep' = {
  name: 'openai-${name}'
  params: {
    name: name
    location: location
    tags: tags
    deploymentName: deploymentName
    modelName: modelName
    modelVersion: modelVersion
    skuName: skuName
    capacity: capacity
  }
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: name
}

// Function App -> Cognitive Services OpenAI User on this account: data-plane batch calls only.
resource appOpenAiUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, functionAppPrincipalId, cognitiveServicesOpenAIUser)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAIUser)
    principalId: functionAppPrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [
    openAi
  ]
}

// This account (system-assigned identity) -> Storage Blob Data Contributor on the storage account.
// Named from the account name, known before deployment, as a role assignment name must be.
resource openAiBlobContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, name, storageBlobDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: openAi.outputs.principalId
    principalType: 'ServicePrincipal'
  }
}

// https://<name>.openai.azure.com/ (with the trailing slash).
output endpoint string = openAi.outputs.endpoint
output name string = openAi.outputs.name
