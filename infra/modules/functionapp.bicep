// Flex Consumption (FC1, Linux) Function App running the Rust custom handler.
//
// - Runtime `custom` 1.0: the host starts `handler` (host.json customHandler.description).
//   On Flex the runtime lives in functionAppConfig.runtime; FUNCTIONS_WORKER_RUNTIME must NOT be
//   an app setting (and FUNCTIONS_EXTENSION_VERSION / WEBSITE_RUN_FROM_PACKAGE neither).
// - Code is deployed to a blob container of the storage account, read by the app's
//   system-assigned identity (no connection string).
// - Host storage (AzureWebJobsStorage) is identity-based: only the account name is configured.
// - Application Insights with Entra ID authentication (no instrumentation-key auth).
// - No key, SAS or connection string is an app setting. The roles the identity needs are granted
//   in roles.bicep.

param name string
param planName string
param location string
param tags object = {}

@description('Name of the storage account used for host storage, deployment package and batch data.')
param storageAccountName string

@description('Blob container the Flex Consumption host deploys the app package from.')
param deploymentContainerName string

@description('Application Insights component name (in this resource group).')
param appInsightsName string

@description('Azure OpenAI endpoint, without trailing slash.')
param openAiEndpoint string

@description('Azure OpenAI data-plane API version used by the handler (`v1` selects /openai/v1/).')
param openAiApiVersion string

@description('Containers of the Contract.')
param inputContainerName string
param outputContainerName string
param stateContainerName string

@description('NCRONTAB schedule of function-timer (function.json uses %BATCH_TIMER_SCHEDULE%).')
param timerSchedule string

@description('Webhook signing secret(s) for function-webhook (AZURE_OPENAI_WEBHOOK_SECRET); empty when webhooks are not set up.')
@secure()
param webhookSecret string = ''

@description('Upper bound of instances Flex Consumption may scale out to (40-1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory per instance. The handler streams files, so 2048 MB is ample.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// `https://<account>.blob.core.windows.net` without the trailing slash, as the handler expects.
var blobEndpoint = storage.properties.primaryEndpoints.blob
var blobEndpointNoSlash = endsWith(blobEndpoint, '/') ? substring(blobEndpoint, 0, length(blobEndpoint) - 1) : blobEndpoint

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    // Linux.
    reserved: true
  }
  // checkov:skip=CKV_AZURE_225:Zone redundancy is an opt-in of Flex Consumption that needs ZRS storage and a zonal region; a batch pipeline whose timer converges on the next tick does not need it.
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    // Used for host storage, the deployment container, the batch containers and Azure OpenAI.
    type: 'SystemAssigned'
  }
  // checkov:skip=CKV_AZURE_222:Event Grid delivers BlobCreated events to the function over the public endpoint (authenticated with the Event Grid extension's system key); there is no VNet here.
  // checkov:skip=CKV_AZURE_17:The only inbound caller is Event Grid, which does not present client certificates.
  // checkov:skip=CKV_AZURE_212:Flex Consumption has no fixed minimum instance count; it scales from zero, which fits a pipeline driven by events and a 5-minute timer (a missed event is picked up by the next tick).
  // checkov:skip=CKV_AZURE_213:App Service health check probes an HTTP path; this app has no HTTP trigger, and the Functions host itself supervises the custom handler process.
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [
        // Host storage, identity-based: the host derives the blob/queue/table URIs from the
        // account name and authenticates with the system-assigned identity.
        {
          name: 'AzureWebJobsStorage__accountName'
          value: storage.name
        }
        // Not a secret in Entra-auth mode: the component refuses key-only ingestion
        // (DisableLocalAuth), and the next setting makes the host send Entra ID tokens.
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsights.properties.ConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'Authorization=AAD'
        }
        // The handler's configuration (Contract; see the README's Configuration table).
        {
          name: 'AZURE_OPENAI_ENDPOINT'
          value: openAiEndpoint
        }
        {
          name: 'AZURE_OPENAI_API_VERSION'
          value: openAiApiVersion
        }
        {
          name: 'BATCH_STORAGE_ACCOUNT_URL'
          value: blobEndpointNoSlash
        }
        {
          name: 'BATCH_INPUT_CONTAINER'
          value: inputContainerName
        }
        {
          name: 'BATCH_OUTPUT_CONTAINER'
          value: outputContainerName
        }
        {
          name: 'BATCH_STATE_CONTAINER'
          value: stateContainerName
        }
        {
          name: 'BATCH_TIMER_SCHEDULE'
          value: timerSchedule
        }
        // Secure parameter, never an output; empty means "no webhooks": the handler then
        // answers every event 401 and polling alone moves jobs on.
        {
          name: 'AZURE_OPENAI_WEBHOOK_SECRET'
          value: webhookSecret
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${blobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'SystemAssignedIdentity'
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    }
  }
}

output id string = functionApp.id
output name string = functionApp.name
output principalId string = functionApp.identity.principalId
output defaultHostName string = functionApp.properties.defaultHostName
