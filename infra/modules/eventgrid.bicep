// Event Grid: BlobCreated and BlobDeleted on batch-input/*.jsonl -> function-trigger
// (a new file is submitted; a deleted file's running job is cancelled).
//
// The system topic is created in step 1 (it needs nothing but the storage account). The
// subscription is step 2: an `AzureFunction` endpoint is validated against the deployed code
// (the function `function-trigger` with its eventGridTrigger binding must exist), so it can only
// be created after `func azure functionapp publish`. Until then function-timer's sweep picks up
// new inputs every 5 minutes, so step 1 alone already works, only with more latency.

param systemTopicName string
param location string
param tags object = {}

@description('Storage account whose blob events are published.')
param storageAccountName string

@description('Create the subscription (only after the code is published; see infra/README.md).')
param deployEventSubscription bool

@description('Resource id of the Function App.')
param functionAppId string

@description('Function that receives the events (a function folder of the package).')
param functionName string

@description('Container that is watched.')
param inputContainerName string

@description('Container that receives undeliverable events.')
param deadLetterContainerName string

@description('Delivery attempts before an event is dead-lettered (1-30).')
@minValue(1)
@maxValue(30)
param maxDeliveryAttempts int

@description('Minutes Event Grid keeps retrying an event (1-1440).')
@minValue(1)
@maxValue(1440)
param eventTimeToLiveInMinutes int

var subscriptionName = '${inputContainerName}-jsonl-to-${functionName}'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: systemTopicName
  location: location
  tags: tags
  identity: {
    // Writes dead-lettered events (Storage Blob Data Contributor on the dead-letter container,
    // roles.bicep); no storage key is involved.
    type: 'SystemAssigned'
  }
  properties: {
    source: storage.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

resource blobCreatedSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = if (deployEventSubscription) {
  parent: systemTopic
  name: subscriptionName
  properties: {
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${functionAppId}/functions/${functionName}'
        // One event per delivery: a failed delivery retries only that blob.
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
        // Deleting an input cancels its job (the timer's sweep would notice too, later).
        'Microsoft.Storage.BlobDeleted'
      ]
      // Subjects look like /blobServices/default/containers/<container>/blobs/<name>.
      subjectBeginsWith: '/blobServices/default/containers/${inputContainerName}/'
      subjectEndsWith: '.jsonl'
      // The handler and the timer's sweep take `.jsonl` exactly (case-sensitive), so the filter does too.
      isSubjectCaseSensitive: true
    }
    retryPolicy: {
      maxDeliveryAttempts: maxDeliveryAttempts
      eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: storage.id
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

output systemTopicName string = systemTopic.name
output principalId string = systemTopic.identity.principalId
output subscriptionName string = deployEventSubscription ? subscriptionName : ''
