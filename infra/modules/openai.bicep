// Azure OpenAI account with one Batch model deployment.
//
// The batch-from-blob feature (`input_blob` / `output_folder`) makes the *service* read the input
// blob and write the results with the account's own identity, which must be SYSTEM-ASSIGNED:
// "User assigned managed identities aren't supported" (Azure OpenAI docs, batch with Blob Storage).
// Its storage role is granted in roles.bicep.

@description('Account name; also its custom subdomain (https://<name>.openai.azure.com), so globally unique.')
@minLength(2)
@maxLength(64)
param name string

@description('Region of the Azure OpenAI account. Must offer the chosen model as a Global Batch / Data Zone Batch deployment.')
param location string

param tags object = {}

@description('Deployment name. This is what every input line must carry in `body.model`.')
param deploymentName string

@description('Model name, e.g. gpt-4o-mini, gpt-4o, gpt-4.1.')
param modelName string

@description('Model version, e.g. 2024-07-18 for gpt-4o-mini.')
param modelVersion string

@description('Batch deployment type: GlobalBatch (any region) or DataZoneBatch (processing stays in the data zone).')
@allowed([
  'GlobalBatch'
  'DataZoneBatch'
])
param skuName string = 'GlobalBatch'

@description('Deployment capacity (sku.capacity). Batch jobs are limited by the subscription\'s enqueued-token quota for this model and deployment type; keep this within the quota the portal shows.')
@minValue(1)
param capacity int

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  identity: {
    // Required by the batch blob feature; user-assigned is not supported there.
    type: 'SystemAssigned'
  }
  properties: {
    // A custom subdomain is required for Entra ID (token) authentication.
    customSubDomainName: name
    // No API keys: the Function App calls the service with its managed identity
    // (Cognitive Services OpenAI User, see roles.bicep).
    disableLocalAuth: true
    // checkov:skip=CKV_AZURE_134:Called by Flex Consumption without VNet integration; every call needs an Entra ID token because local (key) auth is disabled. Use a private endpoint + VNet integration if your policy requires it.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
    }
  }
  // checkov:skip=CKV_AZURE_238:Customer-managed keys need a Key Vault and key rotation process; Microsoft-managed keys are used.
}

// Dynamic quota, dynamicThrottlingEnabled, is recommended by Microsoft for every global
// batch deployment, to help avoid job failures for lack of enqueued-token quota (Azure
// OpenAI batch how-to). It cannot be set here: the deployment schema marks it read-only
// (2024-10-01, the version used here, and the later ones checked), so a PUT does not set it.
// The README deploy steps switch it on with the PATCH the dynamic quota how-to documents,
// step 3b.
resource deployment 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = {
  parent: account
  name: deploymentName
  sku: {
    name: skuName
    capacity: capacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: modelName
      version: modelVersion
    }
    // Keep the model fixed while jobs run for up to 24 h; upgrade deliberately.
    versionUpgradeOption: 'NoAutoUpgrade'
  }
}

output id string = account.id
output name string = account.name
// `https://<name>.openai.azure.com/` (with the trailing slash).
output endpoint string = account.properties.endpoint
output principalId string = account.identity.principalId
output deploymentName string = deployment.name
